from hypothesis import given
from hypothesis import strategies as st

from enrich._sse import ServerSentEvent, SSEDecoder

STREAM = (
    b"\xef\xbb\xbf: hello\n\n"
    b'event: task_run.state\ndata: {"a": 1}\n\n'
    b": keepalive\r\n\r\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"event: x\rdata: caf\xc3\xa9\r\r"
    b"data: {}\n\n"
    b"data: incomplete"
)
EXPECTED = [
    ServerSentEvent(data='{"a": 1}', event="task_run.state"),
    ServerSentEvent(data="line one\nline two"),
    ServerSentEvent(data="café", event="x"),
    ServerSentEvent(data="{}"),
]


def decode(chunks: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


def test_byte_by_byte() -> None:
    assert decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert decode(chunks) == EXPECTED


def test_id_and_retry_fields() -> None:
    events = decode([b"id: 7\nretry: 1500\ndata: x\n\ndata: y\n\n"])
    assert events[0].id == "7" and events[0].retry == 1500
    assert events[1].id == "7"  # the last id sticks, as the spec says


def test_event_without_data_is_not_dispatched() -> None:
    assert decode([b"event: ping\n\nid: 3\n\n"]) == []


@given(
    st.lists(
        st.tuples(st.text(alphabet="ab{}: é", max_size=12), st.sampled_from(["\n", "\r", "\r\n"])),
        min_size=1,
        max_size=30,
    ),
    st.integers(min_value=1, max_value=40),
)
def test_line_endings_mixed_at_random_in_one_chunk_or_many(events: list[tuple[str, str]], size: int) -> None:
    # each event: one data line and a blank line, both ended by the same (random) line end
    stream = "".join(f"data: {text}{end}{end}" for text, end in events).encode()
    expected = [ServerSentEvent(data=text) for text, _ in events]
    assert decode([stream]) == expected
    assert decode([stream[i : i + size] for i in range(0, len(stream), size)]) == expected
