"""Where a checkpoint keeps its files: a small interface, a local directory and an in-process store.

A checkpoint (`enrich._checkpoint`) is a handful of named files: a manifest, append-only Parquet
segments, a few small JSON files replaced whole. It reaches them only through a `CheckpointStore`, so
that a store for object storage (S3, GCS, Azure through obstore or fsspec) can be written without touching
the checkpoint or the engine. What a store must guarantee is what the checkpoint's invariants rest on:

* a file is whole or absent: a reader never sees part of a write, and a write that failed left nothing;
* a write without `overwrite` is write-if-absent: it fails with `FileExistsError` if the name exists
  (segments are append-only with unique names; the manifest is created once);
* one writer at a time (`lock`).

`LocalStore` is a directory, with the guarantees of POSIX: the file is written under `<name>.tmp`,
fsynced, linked (or renamed) into place and the directory fsynced before `write` returns; `lock` is an
`flock` on the directory, which the kernel drops when the process dies. `MemoryStore` keeps the files in
the process, for tests and throwaway jobs.
"""

from __future__ import annotations

import builtins
import errno
import io
import itertools
import os
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from ._exceptions import CheckpointError, UsageError

if sys.platform != "win32":
    import fcntl

__all__ = ["CheckpointStore", "LocalStore", "MemoryStore", "as_store"]

_TMP: Final = ".tmp"
# What os.link raises on a file system without hard links (FAT, some network and FUSE mounts).
_NO_LINKS: Final = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EMLINK")
    if hasattr(errno, name)
)


class CheckpointStore(ABC):
    """Where a checkpoint keeps its files: named whole files in one area, written once or replaced whole.

    Names are relative, with `/` between parts (`"manifest.json"`, `"typed/typed-0f3a.parquet"`); a part
    is never empty, `.` or `..`. A sub-area (`child`) is a store of its own whose files the parent lists
    under the child's name. Errors are `OSError`s (`FileNotFoundError`, `FileExistsError`, or whatever the
    medium raised): the checkpoint turns them into `CheckpointError`s that name `location`.

    To put checkpoints on object storage, subclass it and implement the abstract methods: `location`,
    `list`, `open`, `write`, `delete`, `lock`, `unlock` and `child`. Only `write` is delicate: the object
    must appear whole or not at all (an object store's PUT does that), and without `overwrite` it must
    fail if the name exists (a conditional PUT, `If-None-Match: *`), never replace it.

    Example:

        store = MemoryStore()
        store.write("notes.json", lambda f: f.write(b"{}"))
        with store.open("notes.json") as f:
            assert f.read() == b"{}"
        store.write("notes.json", lambda f: f.write(b"[]"))  # raises FileExistsError
    """

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for messages: a directory path, a URL."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """The names of every whole file whose name starts with `prefix`, sub-areas' included, sorted.

        A file being written is not listed. An area that does not exist lists nothing.
        """

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """The file `name`, open for reading: a seekable binary file (Parquet reads its footer first).

        Raises `FileNotFoundError` if there is none. The caller closes it.
        """

    @abstractmethod
    def write(self, name: str, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> None:
        """Make the file `name` from what `write` writes to the binary file it is given; durable on return.

        Whole or nothing: until this returns no reader sees the file (nor, with `overwrite`, anything but
        the previous one), and if `write` raises, the exception propagates and nothing is left. Without
        `overwrite` it is write-if-absent: `FileExistsError` if `name` exists, the existing file untouched.
        With `overwrite` it replaces the file whole (the small files a checkpoint replaces: pacing.json,
        warnings.json, last_call.json, a manifest that adopts a service).
        """

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the file `name`; a missing one is fine. Need not be durable at once: a file deleted
        just before a crash may come back (the checkpoint deletes only files whose rows are elsewhere)."""

    @abstractmethod
    def lock(self) -> None:
        """Become this area's one writer until `unlock` (and at most until the process ends).

        Raises `CheckpointError` if another writer holds it. A store that cannot lock may do nothing;
        keeping to one writer is then its user's business.
        """

    @abstractmethod
    def unlock(self) -> None:
        """Stop being the writer; nothing if this store does not hold the lock. Never raises."""

    @abstractmethod
    def child(self, name: str) -> CheckpointStore:
        """The sub-area `name` (`"typed"`, `"shards/03"`): a store whose file `x` the parent lists as
        `name + "/" + x`. Its lock is its own."""

    def exists(self) -> bool:
        """Whether the area exists. By default: whether it holds a file (object storage has no folders)."""
        return bool(self.list())

    def create(self) -> None:  # noqa: B027 (a default, not a method to implement)
        """Make the area if it does not exist (nothing by default: a prefix needs no making)."""

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


def as_store(where: str | os.PathLike[str] | CheckpointStore) -> CheckpointStore:
    """`where` itself if it is a store, the object storage of a URL (`s3://bucket/prefix`: an
    `ObjectStore`), else the local directory it names."""
    if isinstance(where, CheckpointStore):
        return where
    if isinstance(where, str) and "://" in where:
        from ._store_object import ObjectStore, is_url

        if where.split("://", 1)[0].lower() in ("gs", "az", "abfs", "abfss", "azure"):
            raise UsageError(
                f"checkpoint {where!r}: gs:// and az:// checkpoints are not supported yet (untested); use "
                "s3:// (or an S3-compatible endpoint) or a directory"
            )
        if not is_url(where):
            raise UsageError(
                f"checkpoint {where!r}: a URL must be object storage (s3://bucket/prefix); or give a "
                "directory"
            )
        return ObjectStore(where)
    return LocalStore(where)


def check_name(name: str) -> str:
    """`name` if it is a valid store name (relative, `/`-separated, no empty, `.` or `..` part)."""
    if not isinstance(name, str) or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"a checkpoint store name is relative, '/'-separated, without '.' or '..': {name!r}")
    return name


class LocalStore(CheckpointStore):
    """A directory on a local file system: today's checkpoint, with POSIX's durability.

    A write goes to `<name>.tmp`, is fsynced, linked into place (which fails if the name exists: a
    write-if-absent without a race) or renamed over the old file with `overwrite`, and the directory is
    fsynced, all before `write` returns. `lock` takes an exclusive `flock` on the directory (the kernel
    drops it when the process dies) and removes the `*.tmp` debris of writes that died; a file system
    without locks (some network mounts) goes on unlocked. `child(name)` is the subdirectory `name`,
    made (and its parent fsynced) on its first write.

    Example: `Checkpoint.open(LocalStore("a.enrich"), fp)` is `Checkpoint.open("a.enrich", fp)`.
    """

    def __init__(self, path: str | os.PathLike[str], *, _root: Path | None = None) -> None:
        self.path = Path(path)
        # The directory this store was made for by its user: never made again by a write (a checkpoint
        # deleted under a running job must fail its writes, not start a headless one).
        self._root = _root if _root is not None else self.path
        self._fd: int | None = None  # the directory, open while locked
        self._locked = False
        self._dirty = False  # deleted since the last directory fsync

    @property
    def location(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self) -> None:
        if self.path.is_dir():
            return
        if self.path.exists():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.path))
        if self._root in self.path.parents:  # a child area (a shard): each level made durable, and the
            self._make_parents(self.path)  # root never made again (a checkpoint deleted under a job)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        _sync_dir_path(self.path.parent)

    def list(self, prefix: str = "") -> builtins.list[str]:
        names: builtins.list[str] = []
        self._walk(self.path, "", prefix, names)
        return sorted(names)

    def _walk(self, directory: Path, under: str, prefix: str, names: builtins.list[str]) -> None:
        try:
            entries = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:
            for entry in entries:
                name = under + entry.name
                if entry.is_dir():
                    sub = name + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        self._walk(Path(entry.path), sub, prefix, names)
                elif name.startswith(prefix) and not name.endswith(_TMP):
                    names.append(name)

    def open(self, name: str) -> BinaryIO:
        return open(self.path / check_name(name), "rb")

    def write(self, name: str, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> None:
        if check_name(name).endswith(_TMP):
            raise ValueError(f"{name!r}: names ending in {_TMP} are the temporary files of a LocalStore")
        final = self.path / name
        self._make_parents(final.parent)
        tmp = final.with_name(final.name + _TMP)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                _fsync(f.fileno())
            if overwrite:
                os.replace(tmp, final)
            else:
                _link_new(tmp, final)
            self._sync(final.parent)
        except BaseException:  # whatever failed, `write` included: no half-written file is left behind
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, name: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.path / check_name(name))
        self._dirty = True  # made durable by the next write's directory fsync, or by `unlock`

    def lock(self) -> None:
        if self._locked:
            raise self._in_use()
        fd = _open_dir(self.path)
        if sys.platform != "win32" and fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _close_fd(fd)
                raise self._in_use() from None
            except OSError:
                pass  # a file system without locks (some network mounts): go on unlocked
        self._fd, self._locked = fd, True
        # The writer is alone now: `*.tmp` files are debris of writes that died (never renamed, never read).
        debris = False
        with suppress(OSError), os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.endswith(_TMP) and not entry.is_dir():
                    with suppress(OSError):
                        os.unlink(entry.path)
                        debris = True
        if debris:
            with suppress(OSError):
                _sync_dir(self._fd)

    def unlock(self) -> None:
        if not self._locked:
            return
        if self._dirty:
            with suppress(OSError):
                _sync_dir(self._fd)
            self._dirty = False
        _close_fd(self._fd)  # closing the descriptor drops the flock
        self._fd, self._locked = None, False

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.path / check_name(name), _root=self._root)

    def _in_use(self) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.path} is in use by another enrich process; wait for it to end or stop it"
        )

    def _make_parents(self, directory: Path) -> None:
        """Make the directories from the root down to `directory` that are missing, each made durable."""
        if directory.is_dir() or directory == self._root or self._root not in directory.parents:
            return
        self._make_parents(directory.parent)
        with suppress(FileExistsError):
            directory.mkdir()
            _sync_dir_path(directory.parent)

    def _sync(self, directory: Path) -> None:
        if directory == self.path and self._fd is not None:
            _sync_dir(self._fd)
            self._dirty = False
        else:
            fd = _open_dir(directory)
            try:
                _sync_dir(fd)
            finally:
                _close_fd(fd)


@dataclass
class _Memory:
    """What the stores of one `MemoryStore()` and its children share."""

    number: int
    files: dict[str, bytes] = field(default_factory=dict)
    areas: set[str] = field(default_factory=set)  # prefixes `create` made (or that were locked)
    locked: set[str] = field(default_factory=set)
    mutex: threading.Lock = field(default_factory=threading.Lock)


_memories = itertools.count(1)


class MemoryStore(CheckpointStore):
    """Files kept in this process (bytes in a dict, behind a lock): for tests and throwaway jobs.

    Everything a checkpoint does works on it, compaction and a reopen of the same instance included;
    nothing outlives the process. Its `location` is `memory://N` (N counts the stores made).

    Example: `enrich(df, {"ceo": "CEO"}, checkpoint=MemoryStore())`.
    """

    def __init__(self) -> None:
        self._memory = _Memory(next(_memories))
        self._prefix = ""
        self._locked = False

    @property
    def location(self) -> str:
        return f"memory://{self._memory.number}" + (f"/{self._prefix.rstrip('/')}" if self._prefix else "")

    def exists(self) -> bool:
        with self._memory.mutex:
            return self._prefix in self._memory.areas or any(
                n.startswith(self._prefix) for n in self._memory.files
            )

    def create(self) -> None:
        with self._memory.mutex:
            self._memory.areas.add(self._prefix)

    def list(self, prefix: str = "") -> builtins.list[str]:
        start = self._prefix + prefix
        with self._memory.mutex:
            return sorted(n[len(self._prefix) :] for n in self._memory.files if n.startswith(start))

    def open(self, name: str) -> BinaryIO:
        key = self._prefix + check_name(name)
        with self._memory.mutex:
            data = self._memory.files.get(key)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), f"{self.location}/{name}")
        return io.BytesIO(data)

    def write(self, name: str, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> None:
        key = self._prefix + check_name(name)
        if not overwrite:
            self._check_absent(key, name)  # early: a whole segment need not be written to be refused
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        with self._memory.mutex:
            if not overwrite:
                self._check_absent(key, name)
            self._memory.files[key] = data

    def _check_absent(self, key: str, name: str) -> None:
        if key in self._memory.files:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), f"{self.location}/{name}")

    def delete(self, name: str) -> None:
        key = self._prefix + check_name(name)
        with self._memory.mutex:
            self._memory.files.pop(key, None)

    def lock(self) -> None:
        with self._memory.mutex:
            if self._prefix in self._memory.locked:
                raise CheckpointError(
                    f"checkpoint {self.location} is in use by another writer; wait for it to end or stop it"
                )
            self._memory.locked.add(self._prefix)
            self._locked = True

    def unlock(self) -> None:
        with self._memory.mutex:
            if self._locked:
                self._memory.locked.discard(self._prefix)
                self._locked = False

    def child(self, name: str) -> MemoryStore:
        store = MemoryStore.__new__(MemoryStore)
        store._memory = self._memory
        store._prefix = self._prefix + check_name(name) + "/"
        store._locked = False
        return store


# -- local files -----------------------------------------------------------------------------------


def _link_new(tmp: Path, final: Path) -> None:
    """Put the complete file `tmp` at `final` unless something is there (`FileExistsError`)."""
    try:
        os.link(tmp, final)  # fails if `final` exists: never a replaced file, whoever else writes
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS and sys.platform != "win32":
            raise
        # No hard links here. Windows' rename refuses an existing target; elsewhere the check before the
        # rename is enough for the one writer that holds the lock.
        if sys.platform != "win32" and os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final)) from None
        os.rename(tmp, final)
        return
    with suppress(OSError):  # the file is in place; a `.tmp` name left over is debris for the next lock
        os.unlink(tmp)


def _fsync(fd: int) -> None:
    # On macOS fsync() leaves data in the drive's cache; F_FULLFSYNC flushes it (a laptop may sleep next).
    full = getattr(fcntl, "F_FULLFSYNC", None) if sys.platform != "win32" else None
    if full is not None:
        try:
            fcntl.fcntl(fd, full)
            return
        except OSError:
            pass
    os.fsync(fd)


def _open_dir(root: Path) -> int | None:
    if sys.platform == "win32":  # no directory handles, no directory fsync
        return None
    return os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _sync_dir(dir_fd: int | None) -> None:
    if dir_fd is not None:
        _fsync(dir_fd)


def _sync_dir_path(path: Path) -> None:
    with suppress(OSError):
        fd = _open_dir(path)
        try:
            _sync_dir(fd)
        finally:
            _close_fd(fd)


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        with suppress(OSError):
            os.close(fd)
