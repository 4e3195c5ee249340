"""Tables in and out: exact CSV text, compressed and several inputs, stdin/stdout, writability checks."""

from __future__ import annotations

import datetime as dt
import errno
import gzip
import io
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import polars as pl
import pytest

from enrich._exceptions import UsageError
from enrich._io import (
    check_checkpoint_dir,
    check_output_path,
    format_of,
    read_table,
    read_tables,
    write_table,
)

# A clean CSV: \n line ends, quotes only where a value needs them. Leading zeros, trailing zeros, a comma,
# a quote, a newline, unicode, a null (empty unquoted field) and an empty string ("" quoted).
CLEAN_CSV = (
    'zip,price,name,note\n02134,1.10,"Acme, Inc.","say ""hi"""\n00501,0010.500,Zoë 😀,"two\nlines"\n'
    '99999,-0,,""\n'
).encode()


def one_line(exc: pytest.ExceptionInfo[UsageError]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def writable(directory: str | Path) -> bool:
    """Whether a file can really be created in `directory` (os.access says yes to root everywhere)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


# -- 1. CSV values round-trip exactly -------------------------------------------------------------------


def test_csv_reads_as_text_and_round_trips_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(CLEAN_CSV)
    df = read_table(src)
    assert all(t == pl.Utf8 for t in df.dtypes), df.schema
    assert df["zip"].to_list() == ["02134", "00501", "99999"]
    assert df["price"].to_list() == ["1.10", "0010.500", "-0"]
    assert df["name"].to_list() == ["Acme, Inc.", "Zoë 😀", None]  # empty unquoted field: null
    assert df["note"].to_list() == ['say "hi"', "two\nlines", ""]  # quoted "": the empty string
    out = tmp_path / "out.csv"
    write_table(df, out)
    assert out.read_bytes() == CLEAN_CSV


def test_text_frame_round_trips_through_csv_keeping_empty_strings_apart_from_nulls(tmp_path: Path) -> None:
    values = ["02134", "1.10", " lead", "trail ", 'q"uote', "com,ma", "new\nline", "cr\r\nlf", "ünï 😀"]
    values += ["NA", "null", "#not a comment", "", None]
    df = pl.DataFrame({"a": values, "b": list(reversed(values))}, schema={"a": pl.Utf8, "b": pl.Utf8})
    for name in ("t.csv", "t.csv.gz"):
        write_table(df, tmp_path / name)
        back = read_table(tmp_path / name)
        # What happens to "" vs null: polars writes the empty string as a quoted "" and null as an empty
        # unquoted field, and reads them back the same way, so both survive the round trip unchanged.
        assert back.equals(df), (name, back.to_dicts())
        assert back["a"].to_list()[-2:] == ["", None]
    # A one-column frame whose last value is null ends in an empty line; it still reads back as null.
    single = pl.DataFrame({"a": ["x", "", None]}, schema={"a": pl.Utf8})
    write_table(single, tmp_path / "s.csv")
    assert read_table(tmp_path / "s.csv")["a"].to_list() == ["x", "", None]


def test_a_column_numeric_for_10000_rows_then_text_reads(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("code\n" + "".join(f"{i}\n" for i in range(10_001)) + "ABC\n")
    df = read_table(src)
    assert df.height == 10_002 and df["code"].dtype == pl.Utf8
    assert df["code"][0] == "0" and df["code"][-1] == "ABC"
    with pytest.raises(UsageError, match=r"cannot read it as csv"):  # what guessing types used to do
        read_table(src, infer_types=True)


def test_infer_types_restores_numbers_and_dates(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("n,price,day,zip\n1,1.10,2024-01-02,02134\n2,2.5,2024-03-04,00501\n")
    df = read_table(src, infer_types=True)
    assert df.schema["n"] == pl.Int64 and df.schema["price"] == pl.Float64
    assert df.schema["day"] == pl.Date and df["day"][0] == dt.date(2024, 1, 2)
    assert df["zip"].to_list() == [2134, 501]  # the price of guessing
    assert read_table(src).schema["n"] == pl.Utf8


def test_typed_formats_keep_their_types(tmp_path: Path) -> None:
    df = pl.DataFrame({"n": [1, 2], "x": [1.5, None], "tags": [["a"], []], "s": ["02134", None]})
    for name in ("t.parquet", "t.jsonl", "t.ndjson.gz", "t.json", "t.json.gz"):
        write_table(df, tmp_path / name)
        back = read_table(tmp_path / name)
        assert back.schema == df.schema, name
        assert back.equals(df), name


def test_jsonl_type_change_after_row_100_reads(tmp_path: Path) -> None:
    rows = [{"a": i} for i in range(150)] + [{"a": 1.5, "b": "late"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = read_table(src)
    assert df.schema == {"a": pl.Float64, "b": pl.Utf8} and df["b"][-1] == "late"


# -- 2. compressed and several inputs -------------------------------------------------------------------


def test_gzip_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "in.csv.gz").write_bytes(gzip.compress(b"zip,price\n02134,1.10\n"))
    assert read_table(tmp_path / "in.csv.gz").to_dicts() == [{"zip": "02134", "price": "1.10"}]
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert read_table(tmp_path / "in.jsonl.gz")["a"].to_list() == [1, 2]
    (tmp_path / "bad.csv.gz").write_bytes(b"zip\n02134\n")  # not gzip at all
    with pytest.raises(UsageError, match=r"bad\.csv\.gz: cannot read it as gzip-compressed csv") as exc:
        read_table(tmp_path / "bad.csv.gz")
    one_line(exc)
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(b"zip\n" + os.urandom(3000).hex().encode())[:-100])
    with pytest.raises(UsageError, match=r"cannot read it as gzip-compressed csv"):
        read_table(tmp_path / "cut.csv.gz")


def test_gzip_output_is_gzip(tmp_path: Path) -> None:
    df = pl.DataFrame({"zip": ["02134"]})
    write_table(df, tmp_path / "out.csv.gz")
    assert gzip.decompress((tmp_path / "out.csv.gz").read_bytes()) == b"zip\n02134\n"


def test_a_glob_of_three_parts_reads_in_sorted_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in (3, 1, 2):  # created out of order: the order comes from the names
        (data / f"part-{i}.csv.gz").write_bytes(gzip.compress(f"id,zip\n{i}a,0{i}\n{i}b,0{i}\n".encode()))
    (data / "other.csv").write_text("id,zip\nX,0\n")
    df = read_tables([str(data / "part-*.csv.gz")])
    assert df["id"].to_list() == ["1a", "1b", "2a", "2b", "3a", "3b"]
    assert df["zip"].to_list() == ["01", "01", "02", "02", "03", "03"]
    # paths and patterns mix, in the order given
    df = read_tables([str(data / "other.csv"), str(data / "part-[12].csv.gz")])
    assert df["id"].to_list() == ["X", "1a", "1b", "2a", "2b"]


def test_parquet_parts_and_mixed_formats_concatenate(tmp_path: Path) -> None:
    for i in range(3):
        pl.DataFrame({"n": [i, i + 10], "s": [f"r{i}", None]}).write_parquet(tmp_path / f"part-{i}.parquet")
    df = read_tables([str(tmp_path / "part-*.parquet")])
    assert df["n"].to_list() == [0, 10, 1, 11, 2, 12] and df.schema["n"] == pl.Int64
    (tmp_path / "a.csv").write_text("s,t\n01,x\n")
    (tmp_path / "b.jsonl").write_text('{"s": "02", "t": "y"}\n')
    (tmp_path / "c.json").write_text('[{"s": "03", "t": "z"}]')
    df = read_tables([tmp_path / "a.csv", tmp_path / "b.jsonl", tmp_path / "c.json"])
    assert df.to_dicts() == [{"s": "01", "t": "x"}, {"s": "02", "t": "y"}, {"s": "03", "t": "z"}]


def test_inputs_with_other_columns_are_refused_naming_the_file_and_difference(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id,name\n1,x\n")
    (tmp_path / "b.csv").write_text("id,name\n2,y\n")
    (tmp_path / "c.csv").write_text("id,title,extra\n3,z,w\n")
    (tmp_path / "d.csv").write_text("name,id\ny,2\n")
    with pytest.raises(UsageError) as exc:
        read_tables([str(tmp_path / "*.csv")])
    msg = one_line(exc)
    assert msg.startswith(
        f"input {tmp_path / 'c.csv'}: its columns differ from those of {tmp_path / 'a.csv'}"
    )
    assert "missing 'name'" in msg and "extra 'title', 'extra'" in msg
    with pytest.raises(UsageError, match=r"d\.csv: .*same columns in another order \('name', 'id'\)"):
        read_tables([tmp_path / "a.csv", tmp_path / "d.csv"])


def test_inputs_with_other_column_types_are_refused(tmp_path: Path) -> None:
    pl.DataFrame({"id": [1], "v": ["a"]}).write_parquet(tmp_path / "a.parquet")
    pl.DataFrame({"id": ["1"], "v": ["b"]}).write_parquet(tmp_path / "b.parquet")
    with pytest.raises(UsageError) as exc:
        read_tables([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert one_line(exc).startswith(f"input {tmp_path / 'b.parquet'}: column 'id' is String here but Int64")
    # CSV read as text against a typed parquet column is a type difference too
    (tmp_path / "c.csv").write_text("id,v\n1,c\n")
    with pytest.raises(UsageError, match=r"c\.csv: column 'id' is String here but Int64"):
        read_tables([tmp_path / "a.parquet", tmp_path / "c.csv"])


def test_a_column_all_null_in_one_input_takes_the_type_of_the_others(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"id": 1, "note": null}\n')
    (tmp_path / "b.jsonl").write_text('{"id": 2, "note": "x"}\n')
    df = read_tables([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert df.schema == {"id": pl.Int64, "note": pl.Utf8} and df["note"].to_list() == [None, "x"]


def test_a_pattern_matching_nothing_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id\n1\n")
    pattern = str(tmp_path / "nothere-*.csv")
    with pytest.raises(UsageError) as exc:
        read_tables([str(tmp_path / "a.csv"), pattern])
    assert one_line(exc) == f"input {pattern}: the pattern matches no file"


def test_no_inputs_twice_named_files_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^no input given"):
        read_tables([])
    (tmp_path / "a.csv").write_text("id\n1\n")
    with pytest.raises(UsageError, match=r"a\.csv is named twice"):
        read_tables([str(tmp_path / "a.csv"), str(tmp_path / "*.csv")])
    with pytest.raises(UsageError, match=r"missing\.csv: no such file"):
        read_tables([str(tmp_path / "a.csv"), str(tmp_path / "missing.csv")])
    with pytest.raises(UsageError, match=r"unknown file type '\.txt'"):
        read_tables([str(tmp_path / "a.csv"), str(tmp_path / "notes.txt")])
    with pytest.raises(UsageError, match=r"is a directory"):
        read_table(tmp_path)
    # a single string is one path, not a sequence of one-letter paths
    assert read_tables(str(tmp_path / "a.csv"))["id"].to_list() == ["1"]  # type: ignore[arg-type]


def test_json_input_must_be_an_array_of_objects(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"zip": "02134", "n": 1, "tags": ["a"]}, {"zip": "00501", "n": None}]))
    df = read_table(src)
    assert df.to_dicts() == [
        {"zip": "02134", "n": 1, "tags": ["a"]},
        {"zip": "00501", "n": None, "tags": None},
    ]
    src.write_text('{"zip": "02134"}')
    with pytest.raises(
        UsageError, match=r"in\.json: a \.json input must hold a JSON array of objects"
    ) as exc:
        read_table(src)
    one_line(exc)
    src.write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"in\.json: cannot read it as json"):
        read_table(src)


def test_json_output_is_an_array_written_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text("old")
    write_table(pl.DataFrame({"a": ["02134", None], "n": [1, 2]}), out)
    assert json.loads(out.read_text()) == [{"a": "02134", "n": 1}, {"a": None, "n": 2}]
    assert not list(tmp_path.glob(".out.json.*"))


# -- 3. stdin and stdout --------------------------------------------------------------------------------


def fake_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes, *, tty: bool = False) -> None:
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data), isatty=lambda: tty))


def test_stdin_is_read_as_csv_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_stdin(monkeypatch, b"zip,price\n02134,1.10\n")
    assert read_tables(["-"]).to_dicts() == [{"zip": "02134", "price": "1.10"}]
    fake_stdin(monkeypatch, gzip.compress(b"zip\n00501\n"))  # gzip is recognised by its first bytes
    assert read_tables(["-"])["zip"].to_list() == ["00501"]


@pytest.mark.parametrize("fmt", ["jsonl", "ndjson", "json", "parquet"])
def test_stdin_in_other_formats(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    df = pl.DataFrame({"n": [1, 2], "s": ["a", None]})
    buffer = io.BytesIO()
    {"jsonl": df.write_ndjson, "ndjson": df.write_ndjson, "json": df.write_json, "parquet": df.write_parquet}[
        fmt
    ](buffer)
    fake_stdin(monkeypatch, buffer.getvalue())
    assert read_tables(["-"], stdin_format=fmt).equals(df)


def test_stdin_with_files_twice_a_terminal_and_bad_formats(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "a.csv").write_text("id\n1\n")
    fake_stdin(monkeypatch, b"id\n2\n")
    assert read_tables([str(tmp_path / "a.csv"), "-"])["id"].to_list() == ["1", "2"]
    fake_stdin(monkeypatch, b"id\n2\n")
    with pytest.raises(UsageError) as exc:
        read_tables(["-", str(tmp_path / "a.csv"), "-"])
    assert one_line(exc) == "input - (stdin) is given twice; stdin can be read only once"
    with pytest.raises(UsageError, match=r"input format 'xml' is unknown; use one of csv, json"):
        read_tables(["-"], stdin_format="xml")
    fake_stdin(monkeypatch, b"", tty=True)
    with pytest.raises(UsageError, match=r"input - \(stdin\) is a terminal"):
        read_tables(["-"])
    fake_stdin(monkeypatch, b"")
    with pytest.raises(UsageError, match=r"input - \(stdin\): cannot read it as csv: empty"):
        read_tables(["-"])


def test_stdout_gets_csv_by_default_and_other_formats_on_request(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    df = pl.DataFrame({"zip": ["02134", "", None], "n": [1, 2, 3]})
    write_table(df, "-")
    assert capsysbinary.readouterr().out == b'zip,n\n02134,1\n"",2\n,3\n'
    write_table(df, "-", format="jsonl")
    lines = capsysbinary.readouterr().out.decode().splitlines()
    assert [json.loads(line) for line in lines] == df.to_dicts()
    write_table(df, "-", format="parquet")
    assert pl.read_parquet(io.BytesIO(capsysbinary.readouterr().out)).equals(df)
    write_table(df, "-", format="json")
    assert json.loads(capsysbinary.readouterr().out) == df.to_dicts()


def test_stdout_is_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Out(io.BytesIO):
        flushed = False

        def flush(self) -> None:
            Out.flushed = True

    out = Out()
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=out))
    write_table(pl.DataFrame({"a": ["1"]}), "-")
    assert out.getvalue() == b"a\n1\n" and Out.flushed


def test_dash_output_is_valid_and_never_the_input() -> None:
    assert check_output_path("-", input_path="-") == Path("-")
    assert check_output_path("-", input_path=["-", "x.csv"], format="parquet") == Path("-")
    with pytest.raises(UsageError, match=r"output format 'xls' is unknown"):
        check_output_path("-", format="xls")


def test_format_of() -> None:
    assert format_of("-", None) == "csv"
    assert format_of("-", "jsonl") == "ndjson"
    assert format_of("out.parquet", None) == "parquet"
    assert format_of("out.PQ", None) == "parquet"
    assert format_of("out.ndjson.gz", None) == "ndjson"
    assert format_of("out.json", None) == "json"
    assert format_of("out.txt", "csv") == "csv"  # an explicit format names an unknown extension's
    assert format_of("out.csv", "CSV") == "csv"
    with pytest.raises(UsageError, match=r"output out\.csv: its extension says csv but the format given"):
        format_of("out.csv", "parquet")
    with pytest.raises(UsageError, match=r"output out\.txt\.gz: unknown file type '\.txt\.gz'"):
        format_of("out.txt.gz", None)


# -- 4. the output (and checkpoint) can be written before anything is paid for --------------------------


def test_output_in_a_writable_directory_passes_and_leaves_nothing(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "out.csv") == tmp_path / "out.csv"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["/proc/out.csv", "/sys/out.csv"])
def test_output_in_a_pseudo_filesystem_is_refused(target: str) -> None:
    if not Path(target).parent.is_dir():
        pytest.skip(f"no {Path(target).parent} here")
    if writable(Path(target).parent):  # make sure it really cannot be created on this machine, even as root
        pytest.skip(f"{Path(target).parent} is writable here")
    with pytest.raises(UsageError) as exc:
        check_output_path(target, input_path="in.csv")
    msg = one_line(exc)
    assert msg.startswith(f"output {target}: cannot write in {Path(target).parent}: ")
    assert msg.endswith("; choose another output path")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in 0o555 directories"
)
def test_output_in_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(UsageError, match=r"cannot write in .*locked: Permission denied; choose another"):
            check_output_path(locked / "out.csv")
    finally:
        locked.chmod(0o755)


def test_a_failing_probe_is_reported_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UsageError) as exc:
        check_output_path(tmp_path / "out.parquet")
    assert one_line(exc) == (
        f"output {tmp_path / 'out.parquet'}: cannot write in {tmp_path}: {os.strerror(errno.EROFS)}; "
        "choose another output path"
    )


def test_a_read_only_target_in_a_writable_directory_passes_and_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("old\n")
    out.chmod(0o444)
    assert check_output_path(out) == out
    write_table(pl.DataFrame({"a": ["new"]}), out)  # the rename replaces it, and the mode is kept
    assert out.read_text() == "a\nnew\n" and out.stat().st_mode & 0o777 == 0o444


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners")
def test_another_users_target_in_a_sticky_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "out.csv").write_text("theirs\n")
    assert check_output_path(shared / "new.csv") == shared / "new.csv"
    assert check_output_path(shared / "out.csv") == shared / "out.csv"  # ours
    stranger = os.stat(shared).st_uid + 4242
    monkeypatch.setattr(os, "geteuid", lambda: stranger)
    with pytest.raises(UsageError, match=r"belongs to another user in the sticky directory"):
        check_output_path(shared / "out.csv")
    assert check_output_path(shared / "new.csv") == shared / "new.csv"


def test_output_that_is_an_input_even_through_a_pattern_is_refused(tmp_path: Path) -> None:
    (tmp_path / "part-1.csv").write_text("a\n1\n")
    with pytest.raises(UsageError, match=r"is the input file"):
        check_output_path(tmp_path / "part-1.csv", input_path=[str(tmp_path / "part-*.csv")])
    with pytest.raises(UsageError, match=r"is the input file"):
        check_output_path(tmp_path / "part-1.csv", input_path=tmp_path / "part-1.csv")
    assert check_output_path(tmp_path / "out.csv", input_path=[str(tmp_path / "part-*.csv"), "-"])


def test_output_checks_kept_from_before(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"the directory .*nowhere does not exist"):
        check_output_path(tmp_path / "nowhere" / "out.csv")
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(UsageError, match=r"is a directory; give a file name"):
        check_output_path(tmp_path / "d.csv")
    with pytest.raises(UsageError, match=r"unknown file type '\.xlsx'"):
        check_output_path(tmp_path / "out.xlsx")
    assert check_output_path(tmp_path / "out.xlsx", format="csv") == tmp_path / "out.xlsx"


def test_checkpoint_dir_existing_or_creatable_passes_without_being_created(tmp_path: Path) -> None:
    (tmp_path / "cp").mkdir()
    assert check_checkpoint_dir(tmp_path / "cp") == tmp_path / "cp"
    assert list((tmp_path / "cp").iterdir()) == []  # the probe is gone
    deep = tmp_path / "a" / "b" / "out.csv.enrich"
    assert check_checkpoint_dir(deep) == deep
    assert sorted(tmp_path.iterdir()) == [tmp_path / "cp"]  # nothing was created


def test_checkpoint_dir_that_cannot_be_made_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError) as exc:
        check_checkpoint_dir(tmp_path / "file" / "cp")
    assert one_line(exc).startswith(f"checkpoint {tmp_path / 'file' / 'cp'}: cannot create it: ")
    with pytest.raises(UsageError, match=r"checkpoint .*file is not a directory"):
        check_checkpoint_dir(tmp_path / "file")
    if Path("/sys").is_dir() and not writable("/sys"):  # not writable even for root
        with pytest.raises(
            UsageError, match=r"^checkpoint /sys/x/cp: cannot create it: cannot write in /sys: "
        ):
            check_checkpoint_dir("/sys/x/cp")

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UsageError) as exc:
        check_checkpoint_dir(tmp_path / "new" / "cp")
    assert one_line(exc) == (
        f"checkpoint {tmp_path / 'new' / 'cp'}: cannot create it: cannot write in {tmp_path}: "
        f"{os.strerror(errno.EACCES)}; choose another checkpoint path"
    )
    (tmp_path / "cp").mkdir()
    with pytest.raises(UsageError, match=r"cp: cannot write in it: Permission denied; choose another"):
        check_checkpoint_dir(tmp_path / "cp")


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """polars would rename the second `a` to `a_duplicated_0`, a name the user never wrote."""
    src = tmp_path / "dup.csv"
    src.write_text("a,a,b\n1,2,3\n")
    with pytest.raises(UsageError, match="the header names 'a' more than once"):
        read_table(src)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"a,b",a\n1,2\n')  # a comma inside a quoted name is one column
    assert read_table(quoted).columns == ["a,b", "a"]


def test_a_parquet_written_in_frames_encodes_unique_text_plainly_and_keeps_every_value(
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from enrich._io import write_frames

    n = 3_000
    frame = pl.DataFrame(
        {
            "name": [f"company {i}" for i in range(n)],  # unique: no dictionary
            "country": ["Canada", "Chile", None] * (n // 3),  # repeats: a dictionary
            "basis": [{"why": "x", "urls": ["u"]}] * n,  # nested: its leaves keep the default
            "n": list(range(n)),
        }
    )
    out = tmp_path / "out.parquet"
    write_frames([frame.slice(0, 1_000), frame.slice(1_000).to_arrow()], frame.schema, out)
    assert pl.read_parquet(out).equals(frame)
    meta = pq.ParquetFile(out).metadata
    encodings = {
        meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
        for i in range(meta.num_columns)
    }
    assert "RLE_DICTIONARY" not in encodings["name"]
    assert "RLE_DICTIONARY" in encodings["country"]
    assert "RLE_DICTIONARY" in encodings["basis.why"]
    assert "RLE_DICTIONARY" in encodings["n"]
    write_frames([], frame.schema, out)  # no frame: an empty table of the schema
    assert pl.read_parquet(out).schema == frame.schema and pa.types.is_integer(
        pq.read_schema(out).field("n").type
    )
