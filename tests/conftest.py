"""Suite-wide setup: default checkpoints go to a directory of each test, never to the user's cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test gets its own: tests start emulators that share an address (http://emulator), and a
    # default checkpoint is keyed by the job and the address.
    monkeypatch.setenv("ENRICH_CACHE_DIR", str(tmp_path_factory.mktemp("enrich-cache")))
