"""Suite-wide setup: default checkpoints go to a directory of each test, never to the user's cache, and
temporary ones (`checkpoint=False`) to pytest's temporary directories, never to the machine's /tmp."""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test gets its own: tests start emulators that share an address (http://emulator), and a
    # default checkpoint is keyed by the job and the address.
    monkeypatch.setenv("ENRICH_CACHE_DIR", str(tmp_path_factory.mktemp("enrich-cache")))
    # A checkpoint=False that ends with rows unfinished is kept for its user to resume (by design): in a
    # test, it is kept where pytest cleans up. (In this process only: a Ray cluster started by a module
    # fixture keeps its own /tmp/ray, whose socket paths must stay short.)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmp")))
