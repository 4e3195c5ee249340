"""`_basis` keeps every entry the service sent, the per-element ones of array fields (`field.0`,
`field.1`, ...) too, in a shape that explodes to one row per entry: each entry's `field` is a top-level
field and `element` the index of the array element it is about, null for the whole field (issue 13).
Against the emulator, in-process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from enrich import EmulatorConfig, create_app
from enrich._engine import aenrich
from enrich._engine.join import _BASIS, _per_element

OUTPUT = {
    "ceo": "Name of the current CEO",
    "products": ("array", "Main products"),
    "offices": ("array[string]", "Cities with an office"),
}


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i}" for i in range(n)]})


def run_job(app: Any, data: Any, output: Any = OUTPUT, **kw: Any) -> Any:
    kw.setdefault("progress", False)
    kw.setdefault("processor", "core")
    return asyncio.run(
        aenrich(
            data,
            output,
            api_key="test-key",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            basis=True,
            **kw,
        )
    )


def sent_basis(app: Any, run_ids: list[str]) -> list[list[dict[str, Any]]]:
    """Each run's basis as the emulator answers GET /v1/tasks/runs/{id}/result."""

    async def main() -> list[list[dict[str, Any]]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as c:
            got = []
            for r in run_ids:
                answer = await c.get(f"/v1/tasks/runs/{r}/result", headers={"x-api-key": "k"})
                got.append(answer.json()["output"]["basis"])
            return got

    return asyncio.run(main())


def as_sent(entry: dict[str, Any]) -> str:
    return entry["field"] if entry["element"] is None else f"{entry['field']}.{entry['element']}"


def test_every_entry_is_kept_and_explodes_to_one_row_per_element(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(6)
    out = run_job(app, df, checkpoint=tmp_path / "cp")
    assert out.schema["_basis"] == pl.List(
        pl.Struct(
            {
                "field": pl.String,
                "element": pl.Int64,
                "reasoning": pl.String,
                "confidence": pl.String,
                "citations": pl.List(
                    pl.Struct({"url": pl.String, "title": pl.String, "excerpts": pl.List(pl.String)})
                ),
            }
        )
    )
    sent = sent_basis(app, out["_run_id"].to_list())
    for row, service in zip(out.iter_rows(named=True), sent, strict=True):
        # every entry, in the service's order, its name as sent recoverable, its reasoning as sent
        assert [as_sent(e) for e in row["_basis"]] == [b["field"] for b in service]
        assert [e["reasoning"] for e in row["_basis"]] == [b["reasoning"] for b in service]
        for name in ("products", "offices"):
            elements = [
                e["element"] for e in row["_basis"] if e["field"] == name and e["element"] is not None
            ]
            assert elements == list(range(len(row[name])))  # one per element of the answer
        assert [e["element"] for e in row["_basis"] if e["field"] == "ceo"] == [None]
    # One row per entry; per element, a filter away.
    rows = out.select("company", "products", "_basis").explode("_basis").unnest("_basis")
    assert rows.height == sum(len(b) for b in sent)
    per = rows.filter(pl.col("field") == "products", pl.col("element").is_not_null())
    assert per.height == sum(len(p) for p in out["products"])
    assert per.group_by("company", maintain_order=True).agg(pl.col("element").max() + 1)[
        "element"
    ].to_list() == [len(p) for p in out["products"]]
    # A resume reads the basis the checkpoint kept as the service sent it: the same column.
    again = run_job(app, df, checkpoint=tmp_path / "cp")
    assert again["_basis"].to_list() == out["_basis"].to_list() and app.stats()["runs_created"] == 6


def test_whole_field_entries_name_their_field_with_no_element(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    out = run_job(
        app, companies(3), {"ceo": "CEO", "founded": ("integer", "Year")}, checkpoint=tmp_path / "cp"
    )
    for entries in out["_basis"].to_list():
        assert [(e["field"], e["element"]) for e in entries] == [("ceo", None), ("founded", None)]
    text = run_job(app, companies(2), "A one-line summary", checkpoint=tmp_path / "text")
    assert [[(e["field"], e["element"]) for e in b] for b in text["_basis"].to_list()] == [
        [("output", None)]
    ] * 2


def test_only_a_field_s_own_numbered_entries_are_elements() -> None:
    # The rule the join applies to each entry's name: `f.N` is element N of `f` when `f` is a top-level
    # field and `f.N` is not one itself; anything else is kept as sent.
    def entry(name: str) -> dict[str, Any]:
        return {"field": name, "reasoning": name, "confidence": None, "citations": []}

    names = ["tags", "tags.0", "v.2", "tags.x", "other.1", "a.b.7", "tags.99999999999999999999", "tags."]
    basis = pl.Series([[entry(n) for n in names], [], None], dtype=_BASIS)
    got = _per_element(basis, ["tags", "v.2", "a.b"]).to_list()
    assert [(e["field"], e["element"], e["reasoning"]) for e in got[0]] == [
        ("tags", None, "tags"),
        ("tags", 0, "tags.0"),
        ("v.2", None, "v.2"),  # a field of that very name
        ("tags.x", None, "tags.x"),
        ("other.1", None, "other.1"),  # not a field of the job's
        ("a.b", 7, "a.b.7"),
        ("tags.99999999999999999999", None, "tags.99999999999999999999"),  # no Int64 holds it
        ("tags.", None, "tags."),
    ]
    assert got[1:] == [[], None]
