"""Files of a shared cache folder, treated as untrusted: anyone who can write to the folder may
have planted a symbolic link, a FIFO or a folder where an entry or a lock should be.

Every path below the cache root is reached through directory descriptors opened with
``O_NOFOLLOW`` (so no link, at any depth, leads out of the folder), files are opened with
``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot block the reader) and refused unless they are regular
files, and new files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never through a link).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class NotRegularFile(OSError):
    """A path in the cache is a link, a FIFO, a device or a folder where a file belongs."""

    def __str__(self) -> str:
        return str(self.args[0])


class CacheFullError(OSError):
    """No space left for a cache entry: named, with the folder and the space needed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.args[1])


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device")):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def describe(path: str | os.PathLike[str], dir_fd: int | None = None) -> str:
    """What a non-regular path is ("symbolic link", "FIFO", ...), without following it."""
    try:
        return _kind(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return "special file"


def remove(name: str, dir_fd: int) -> None:
    """Delete a file, link, FIFO or folder tree in ``dir_fd`` (links are never followed)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError) as err:
        if describe(name, dir_fd) != "folder":
            raise err from None
        with open_folder_fd(dir_fd, name) as sub:
            for child in os.listdir(sub):
                remove(child, sub)
        os.rmdir(name, dir_fd=dir_fd)


@contextlib.contextmanager
def open_folder_fd(dir_fd: int, name: str) -> Iterator[int]:
    fd = os.open(name, _DIR, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder(base: Path, parts: Sequence[str], create: bool = False) -> Iterator[int]:
    """A descriptor of ``base/parts...`` reached without following any link below ``base``.

    ``create``: missing folders are made, and a link or file in place of one is removed (with a
    warning naming it) and replaced by a folder. Otherwise a missing folder raises
    FileNotFoundError and a link or file raises :class:`NotRegularFile`.
    """
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            for _ in range(3):  # a race with another healer: try again
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    sub = os.open(part, _DIR, dir_fd=fd)
                    break
                except OSError as err:
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR) and not (
                        create and err.errno == errno.ENOENT
                    ):
                        raise
                    where = base.joinpath(*parts[: i + 1])
                    kind = describe(part, fd)
                    if not create:
                        raise NotRegularFile(f"{where} is a {kind}, not a folder") from None
                    warnings.warn(
                        f"teacher-token cache: {where} is a {kind}, not a folder; replacing it "
                        "(links are never followed)",
                        stacklevel=3,
                    )
                    remove(part, fd)
            else:
                raise NotRegularFile(f"{base.joinpath(*parts[: i + 1])} keeps changing")
            os.close(fd)
            fd = sub
        yield fd
    finally:
        os.close(fd)


def open_regular(name: str, dir_fd: int, where: Path) -> IO[bytes]:
    """Open an existing file for reading: a regular file, not a link; never blocks."""
    try:
        fd = os.open(name, os.O_RDONLY | _FILE, dir_fd=dir_fd)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise NotRegularFile(f"{where} is a symbolic link, not a regular file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(f"{where} is a {_kind(mode)}, not a regular file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def create_locked_temp(name: str, dir_fd: int) -> IO[bytes]:
    """A new temporary file (never through a link), holding a shared ``flock`` from the start:
    ``prune`` deletes a temporary file only when it can lock it exclusively (its writer died)."""
    for _ in range(3):
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE, 0o644, dir_fd=dir_fd)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink:  # not swept by a prune between the creation and the lock
            return os.fdopen(fd, "w+b")
        os.close(fd)
    raise OSError(errno.EAGAIN, f"temporary file {name} was removed while being created")


def lock_file(name: str, dir_fd: int, where: Path) -> int:
    """Descriptor of a lock file, created if missing (mode 0o644, read-only so any user of a
    shared cache can ``flock`` it); a link or special file in its place is replaced."""
    for _ in range(3):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CREAT | _FILE, 0o644, dir_fd=dir_fd)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        warnings.warn(
            f"teacher-token cache: lock {where} is a {describe(name, dir_fd)}, not a regular "
            "file; replacing it",
            stacklevel=3,
        )
        remove(name, dir_fd)
    raise NotRegularFile(f"lock {where} keeps being replaced by a non-regular file")


def write_new(name: str, data: bytes, dir_fd: int, tag: str) -> None:
    """Write ``name`` atomically: a temporary file (removed on failure), then ``os.replace``."""
    tmp = f".{name}.{tag}.tmp"
    try:
        with create_locked_temp(tmp, dir_fd) as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem that holds ``path`` or, when it does not exist yet, its
    nearest existing ancestor (where it will be created)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def walk(root: Path) -> Iterator[tuple[Path, os.DirEntry[str]]]:
    """(folder, entry) of everything under ``root``, never descending through a link."""
    stack = [] if root.is_symlink() else [root]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for entry in entries:
            yield here, entry
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))


def inode(name: str, dir_fd: int) -> int:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino


def exists(name: str, dir_fd: int) -> bool:
    """Whether ``name`` exists in ``dir_fd`` (a dangling link counts: it is not followed)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
