"""A checkpoint on object storage (S3 and S3-compatible servers): `ObjectStore`, through obstore (`pip install
'enrich[cloud]'`).

A checkpoint rests on three guarantees of its store (`enrich._store`); on object storage they come from:

* whole or absent: a PUT makes an object whole or not at all;
* write-if-absent: a conditional PUT (`If-None-Match: *`), so a segment's name is taken once: a second
  writer that finds it taken gets `FileExistsError` and writes nothing;
* one writer: object storage has no lock, so `lock` takes a *lease*, an object `.enrich-lease` in the area
  created if absent and renewed every `lease / 4` seconds by a conditional PUT on its ETag.

What if the process holding a lease dies (a Ray or Spark worker killed mid-shard)? Its lease stops changing.
A new writer that finds a lease watches it, on its own clock, and takes it over (a conditional PUT on the
ETag it watched, so that of two new writers one wins) once it has not changed for `lease` seconds; a lease
that changes while watched has a live holder, and `lock` raises as a held `flock` does. The holder, for its
part, counts its lease valid only for `2/3 * lease` after the start of its last renewal that succeeded:
`write` refuses before and after its PUT once it is not, so that a holder cut off from the store (or paused)
stops writing before anyone can take over, and a write that lands too late raises instead of returning. A
taker therefore sees, when it reads the area, every segment the old holder wrote and acted on; intents
written just before a send are reconciled through the task group, as after a crash on one machine.

Credentials and the endpoint come from the environment as obstore reads them (`AWS_ACCESS_KEY_ID`,
`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...), on each
machine that opens the store: they are never pickled or written into the checkpoint.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, BinaryIO, Final

from ._exceptions import CheckpointError, UsageError
from ._store import CheckpointStore, check_name

__all__ = ["SCHEMES", "ObjectStore", "ObjectStoreError"]

#: URL schemes taken: S3 and S3-compatible servers (tested against moto's). obstore also reads gs:// and
#: az://, whose conditional PUTs differ (GCS replaces by generation, not ETag); untested, so refused.
SCHEMES: Final = ("s3", "s3a")
#: The lease object of an area: not one of its files (never listed).
LEASE: Final = ".enrich-lease"
#: How long a lease lasts without renewal, by default: a killed worker's shard waits this long.
LEASE_SECONDS: Final = 30.0


def _obstore() -> Any:
    try:
        import obstore
        import obstore.exceptions
        import obstore.store
    except ImportError:
        message = "a checkpoint on object storage needs obstore: pip install 'enrich[cloud]'"
        raise UsageError(message) from None
    return obstore


def is_url(where: object) -> bool:
    """Whether `where` is a URL of object storage (`s3://bucket/prefix`, ...)."""
    return isinstance(where, str) and where.split("://", 1)[0].lower() in SCHEMES and "://" in where


def _clock() -> float:
    """Seconds on a clock that keeps counting while the machine sleeps (CLOCK_BOOTTIME on Linux), so a
    laptop that wakes after its lease ran out knows it; `time.monotonic` elsewhere."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


class _Lease:
    """The lease an `ObjectStore` holds on its area while locked, renewed by a thread of its own."""

    def __init__(self, store: ObjectStore, key: str, put: Any, token: str, started: float) -> None:
        self.store, self.key, self.token, self.seconds = store, key, token, store.lease_seconds
        self.version = _version(put)
        self.renewed = started  # when the last PUT that succeeded began (`_clock`)
        self.lost = False
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="enrich-lease", daemon=True)
        self._thread.start()

    def valid(self) -> bool:
        return not self.lost and _clock() - self.renewed < self.seconds * 2 / 3

    def _renew(self) -> None:
        obstore = self.store._obstore
        while not self._stop.wait(self.seconds / 4):
            started = _clock()
            self.count += 1
            body = self.store._lease_body(self.token, self.count)
            try:
                put = obstore.put(self.store._store, self.key, body, mode=self.version)
            except obstore.exceptions.PreconditionError:
                # Taken over, or our own last renewal landed but its answer was lost (its ETag unknown
                # to us): the lease's body says which, by its token.
                try:
                    found = obstore.get(self.store._store, self.key)
                    mine = _token(bytes(found.bytes())) == self.token
                except Exception:
                    continue  # cut off: try again; `valid` runs out meanwhile
                if not mine:
                    self.lost = True  # another writer took it over: this one must write no more
                    return
                self.version = _version(found.meta)
                continue
            except Exception:
                continue  # cut off from the store: try again; `valid` runs out meanwhile
            self.version, self.renewed = _version(put), started

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost:
            return
        obstore = self.store._obstore
        try:  # marked released (not deleted: a delete is unconditional and could remove a taker's lease)
            body = json.dumps({"released": True}).encode()
            obstore.put(self.store._store, self.key, body, mode=self.version)
        except Exception:
            pass


class ObjectStore(CheckpointStore):
    """A checkpoint area on object storage: `ObjectStore("s3://bucket/jobs/ceo")`.

    `where` is an `s3://` URL read by obstore with the credentials of the environment (S3 or an
    S3-compatible server: `AWS_ENDPOINT_URL`), or an obstore store object (`obstore.store.S3Store(...)`,
    `MemoryStore()`). `lease` is how long the lease that makes this process the area's one writer lasts
    without renewal: a writer that died holding it keeps the area for that long (a taker waits the
    longer of its own and the holder's). Files are read whole into memory (a segment is a few MB).

    Example:

        store = ObjectStore("s3://bucket/jobs/ceo")
        enrich(df, {"ceo": "Name of the CEO"}, checkpoint=store)
    """

    def __init__(
        self, where: str | Any, *, lease: float = LEASE_SECONDS, _base: str = "", _url: str | None = None
    ) -> None:
        self._obstore = _obstore()
        if isinstance(where, str):
            if not is_url(where):
                raise UsageError(
                    f"{where!r} is not an object-storage URL: give s3:// followed by the bucket and prefix"
                )
            if not (isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0):
                raise UsageError(f"lease must be a positive number of seconds, got {lease!r}")
            # A request, with its retries, never outlasts a third of the lease: a write that lands after
            # the holder's lease ran out would land beside its taker's.
            bound = timedelta(seconds=max(1.0, lease / 3))
            client: dict[str, Any] = {"timeout": bound, "connect_timeout": min(bound, timedelta(seconds=5))}
            if os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true"):
                client["allow_http"] = True  # (client options given replace those read from the environment)
            try:
                self._store = self._obstore.store.from_url(
                    where, client_options=client, retry_config={"max_retries": 3, "retry_timeout": bound}
                )
            except Exception as exc:
                raise UsageError(f"cannot use {where}: {exc}".splitlines()[0]) from None
            url = where.rstrip("/")
        else:
            self._store, url = where, _url or f"{type(where).__name__}:/"
        if not (isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0):
            raise UsageError(f"lease must be a positive number of seconds, got {lease!r}")
        self.lease_seconds = float(lease)
        self._base = _base
        self._url = url
        self._lease: _Lease | None = None

    @property
    def url(self) -> str:
        """The URL of the store's root (without its area), for rebuilding it on another machine."""
        return self._url

    @property
    def location(self) -> str:
        return f"{self._url}/{self._base}" if self._base else self._url

    def _key(self, name: str) -> str:
        return f"{self._base}/{name}" if self._base else name

    def _lease_body(self, token: str, count: int) -> bytes:
        # The token names this holder (a renewal whose answer was lost is known by it); the count makes
        # each renewal a new ETag (an ETag is a hash of the body), so that watchers see it change; the
        # seconds tell a taker how long to watch.
        body = {"token": token, "host": socket.gethostname(), "pid": os.getpid()}
        return json.dumps(body | {"seconds": self.lease_seconds, "renewal": count}).encode()

    def list(self, prefix: str = "") -> builtins.list[str]:
        full = self._key(prefix)
        # obstore lists by whole path parts: list the folder `full` is in and keep the names it starts.
        folder = full.rsplit("/", 1)[0] if "/" in full else None
        start = f"{self._base}/" if self._base else ""
        names: builtins.list[str] = []
        try:
            for batch in self._obstore.list(self._store, prefix=folder):
                for meta in batch:
                    path = meta["path"]
                    if path.startswith(full) and path.startswith(start) and path.rsplit("/", 1)[-1] != LEASE:
                        names.append(path[len(start) :])
        except FileNotFoundError:
            return []
        except self._obstore.exceptions.BaseError as exc:
            raise ObjectStoreError(f"cannot list {self.location}: {_explain(exc)}") from exc
        return sorted(names)

    def open(self, name: str) -> BinaryIO:
        try:
            data = self._obstore.get(self._store, self._key(check_name(name))).bytes()
        except FileNotFoundError:
            raise
        except self._obstore.exceptions.BaseError as exc:
            raise ObjectStoreError(f"cannot read {name}: {_explain(exc)}") from exc
        return io.BytesIO(bytes(data))

    def write(self, name: str, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> None:
        key = self._key(check_name(name))
        buffer = io.BytesIO()
        write(buffer)
        self._check_lease()
        try:
            mode = "overwrite" if overwrite else "create"
            self._obstore.put(self._store, key, buffer.getbuffer(), mode=mode)
        except self._obstore.exceptions.AlreadyExistsError:
            raise FileExistsError(f"{self.location}: {name} exists") from None
        except self._obstore.exceptions.BaseError as exc:
            raise ObjectStoreError(f"cannot write {name}: {_explain(exc)}") from exc
        self._check_lease()  # a write that landed after the lease ran out may not be acted on

    def delete(self, name: str) -> None:
        self._check_lease()
        try:
            self._obstore.delete(self._store, self._key(check_name(name)))
        except FileNotFoundError:
            pass
        except self._obstore.exceptions.BaseError as exc:
            raise ObjectStoreError(f"cannot delete {name}: {_explain(exc)}") from exc

    def lock(self) -> None:
        if self._lease is not None:
            raise self._in_use()
        obstore = self._obstore
        key = self._key(LEASE)
        token = uuid.uuid4().hex
        body = self._lease_body(token, 0)
        watched: str | None = None  # the ETag of another writer's lease, and since when it has not changed
        since = 0.0
        try:
            while True:
                started = _clock()
                try:
                    put = obstore.put(self._store, key, body, mode="create")
                    break
                except obstore.exceptions.AlreadyExistsError:
                    pass
                try:
                    found = obstore.get(self._store, key)
                except FileNotFoundError:
                    continue  # removed meanwhile: create it
                e_tag, held = found.meta["e_tag"], bytes(found.bytes())
                released, seconds = _released(held), _seconds(held)
                if not released and e_tag != watched:
                    if watched is not None:
                        raise self._in_use()  # it was renewed while watched: its writer is alive
                    watched, since = e_tag, _clock()
                # Watched for the holder's lease, not ours: a holder with a longer one renews less often.
                if released or _clock() - since >= max(self.lease_seconds, seconds):
                    started = _clock()
                    try:  # taken over only if it is still the lease watched (of two takers, one wins)
                        put = obstore.put(self._store, key, body, mode=_version(found.meta))
                        break
                    except obstore.exceptions.PreconditionError:
                        watched = None
                        continue
                time.sleep(min(1.0, self.lease_seconds / 10))
        except obstore.exceptions.BaseError as exc:  # (not found and exists are OSErrors already)
            raise ObjectStoreError(f"cannot take the lease of {self.location}: {_explain(exc)}") from exc
        self._lease = _Lease(self, key, put, token, started)

    def unlock(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def child(self, name: str) -> ObjectStore:
        return ObjectStore(
            self._store, lease=self.lease_seconds, _base=self._key(check_name(name)), _url=self._url
        )

    def _check_lease(self) -> None:
        if self._lease is not None and not self._lease.valid():
            raise CheckpointError(
                f"checkpoint {self.location}: this process lost its lease on the area (cut off from the "
                f"store for {self.lease_seconds * 2 / 3:.0f} s, or another writer took it over); nothing "
                "more is written: run the job again"
            )

    def _in_use(self) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.location} is in use by another enrich process (its lease is being renewed); "
            "wait for it to end or stop it"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its URL where it is unpickled (credentials from that machine's environment).
        if not is_url(self._url):
            raise TypeError(f"an ObjectStore of {self._url} cannot be sent to another process: give a URL")
        return (_rebuild, (self._url, self.lease_seconds, self._base))


def _rebuild(url: str, lease: float, base: str) -> ObjectStore:
    store = ObjectStore(url, lease=lease)
    return store.child(base) if base else store


def _lease_of(body: bytes) -> dict[str, Any]:
    try:
        found = json.loads(body)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _released(body: bytes) -> bool:
    return bool(_lease_of(body).get("released"))


def _token(body: bytes) -> str | None:
    return _lease_of(body).get("token")


def _seconds(body: bytes) -> float:
    """How long the lease in `body` lasts; one that does not say (damaged, foreign) is watched an hour."""
    seconds = _lease_of(body).get("seconds")
    return float(seconds) if isinstance(seconds, (int, float)) and 0 < seconds <= 86_400 else 3_600.0


def _version(meta: Any) -> dict[str, Any]:
    """The mode of a PUT that replaces exactly this version of an object: its ETag (S3, Azure) and its
    version or generation (GCS needs it)."""
    return {k: meta[k] for k in ("e_tag", "version") if meta.get(k) is not None}


class ObjectStoreError(CheckpointError, OSError):
    """Object storage refused or could not be reached: a `CheckpointError` (one line, exit 2 from the
    command line) that is also the `OSError` the store interface promises."""


def _explain(exc: BaseException) -> str:
    """One line a user can act on, for obstore's errors (which carry the service's whole answer)."""
    text = str(exc)
    lowered = text.lower()
    if "nosuchbucket" in lowered:
        return "the bucket does not exist: create it, or check the URL"
    if "169.254.169.254" in text or "credential" in lowered or ("missing" in lowered and "key" in lowered):
        return (
            "no credentials for object storage: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
            "AWS_ENDPOINT_URL for an S3-compatible server)"
        )
    if any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "403")):
        return "access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's permissions"
    if any(s in lowered for s in ("dns error", "connection refused", "error sending request", "timed out")):
        return (
            "cannot reach object storage (for an S3-compatible server, set AWS_ENDPOINT_URL and, for "
            "http://, AWS_ALLOW_HTTP=true)"
        )
    line = _first_line(exc)
    return line if len(line) <= 200 else line[:197] + "..."


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
