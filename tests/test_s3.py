"""A checkpoint on S3 (moto's S3 server on 127.0.0.1): `enrich run --checkpoint s3://...`, `enrich status`
of it, `enrich()` given the URL, and the lease against a second process.

Opt-in: ENRICH_S3=1, with `pip install 'enrich[cloud]' 'moto[server]'`. (The same store's contract runs in
the default suite on obstore's in-memory store: tests/test_store.py; the Ray job on S3: tests/test_ray.py.)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

if not os.environ.get("ENRICH_S3"):
    pytest.skip("set ENRICH_S3=1 (and pip install 'enrich[cloud]' 'moto[server]')", allow_module_level=True)
pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from enrich import CheckpointError, Emulator, ObjectStore, enrich  # noqa: E402
from enrich._cli import main  # noqa: E402

FIELDS = ["--field", "ceo=Name of the CEO", "--field", "founded:integer=Year founded"]


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "AWS_ACCESS_KEY_ID": "enrich-test",
        "AWS_SECRET_ACCESS_KEY": "enrich-test",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="enrich-s3")
        yield "s3://enrich-s3"
    finally:
        server.stop()


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    with Emulator(api_key="sk-s3-test", latency=0.05) as emulator:
        monkeypatch.setenv("PARALLEL_API_KEY", "sk-s3-test")
        monkeypatch.setenv("PARALLEL_BASE_URL", emulator.url)
        yield emulator


def test_the_cli_runs_resumes_and_reports_a_job_on_s3(
    bucket: str, emu: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "in.csv"
    pl.DataFrame({"company": [f"Company {i}" for i in range(40)]}).write_csv(table)
    out = tmp_path / "out.parquet"
    url = f"{bucket}/jobs/ceo"
    args = ["run", str(table), "-o", str(out), *FIELDS, "--processor", "lite", "--no-progress"]
    assert main([*args, "--checkpoint", url]) == 0
    first = pl.read_parquet(out)
    assert (first["_status"] == "completed").all() and emu.stats()["runs_created"] == 40
    assert not (tmp_path / "out.parquet.enrich").exists()  # nothing local: the checkpoint is on S3
    names = ObjectStore(url).list()
    assert "manifest.json" in names and any(n.startswith("receipts-") for n in names)
    assert main([*args, "--checkpoint", url]) == 0  # resumed from S3: nothing sent again
    assert emu.stats()["runs_created"] == 40 and pl.read_parquet(out).equals(first)
    capsys.readouterr()
    assert main(["status", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"]["completed"] == 40 and report["runs_created"] == 40
    assert main(["status", f"{bucket}/nothing"]) == 2
    capsys.readouterr()
    # A bucket that does not exist: one line that says so, exit 2, nothing sent.
    assert main([*args, "--checkpoint", "s3://enrich-s3-missing/jobs/ceo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the bucket does not exist" in err[0], err
    assert emu.stats()["runs_created"] == 40


def test_enrich_takes_the_url_and_a_second_writer_is_refused(bucket: str, emu: Emulator) -> None:
    df = pl.DataFrame({"company": [f"Company {i}" for i in range(10)]})
    url = f"{bucket}/jobs/notebook"
    kw = {"processor": "lite", "progress": False, "checkpoint": url}
    first = enrich(df, {"ceo": "Name of the CEO"}, **kw)
    assert (first["_status"] == "completed").all()
    holder = ObjectStore(url, lease=2)
    holder.lock()  # another process holds the area's lease and renews it
    try:
        with pytest.raises(CheckpointError, match="in use by another"):
            enrich(df, {"ceo": "Name of the CEO"}, **kw)
    finally:
        holder.unlock()
    again = enrich(df, {"ceo": "Name of the CEO"}, **kw)
    assert again.equals(first) and emu.stats()["runs_created"] == 10
