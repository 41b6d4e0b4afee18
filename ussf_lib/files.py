"""Writing outputs whole, saying in one line which file a refused write was for, and one process per run folder.

* :func:`writing` (and :func:`write_text`, :func:`write_csv`) write to a temporary file beside the target and
  rename it into place, so an interruption leaves the old file or the new one, whole. A write the system refuses
  (a full disk, a read-only file system, no permission) removes the temporary file and becomes a
  :class:`~ussf_lib.errors.UserError` naming the file and the fix (:func:`write_error`).
* Temporary files are named ``.NAME.tmp<pid>-<thread>-<random>``: unique per process and thread, and found by
  :func:`remove_temp_files` (pattern ``.*.tmp*``) when they are left behind by a killed process.
* :func:`run_lock` holds ``FOLDER/.lock`` (an ``flock``, with ``pid@host`` inside) while a command works in a
  run folder, so a second process stops with one line naming the first. The system releases an ``flock`` when
  its process dies, so a lock left by a killed process never blocks anyone.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ussf_lib.errors import UserError

#: The lock file of a run or comparison folder.
LOCK_NAME = ".lock"
#: What temporary files look like (``.NAME.tmp...``); every writer here uses :func:`temp_path`.
TEMP_GLOB = ".*.tmp*"

_FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space (the disk quota is used up)",
    errno.EROFS: "the file system is read-only; make it writable or choose another folder",
    errno.EACCES: "you may not write there; fix the folder's permissions or choose another folder",
    errno.EPERM: "you may not write there; fix the folder's permissions or choose another folder",
}


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path``, unique per process and thread: ``.NAME.tmp<pid>-<thread>-<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident():x}-{secrets.token_hex(3)}")


def _write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the system refusing a write: an OSError, or torch's RuntimeError for a file it could
    not finish (a full disk makes ``torch.save`` raise ``RuntimeError: ... unexpected pos ...``)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("unexpected pos", "file write failed",
                                                                       "PytorchStreamWriter", "inline_container"))


def write_error(path: str | os.PathLike, exc: BaseException, then: str = "run the command again") -> UserError:
    """The one-line error for a refused write of ``path``: what the system said, and the fix, then ``then``."""
    path = Path(path)
    code = getattr(exc, "errno", None)
    if code is None and not isinstance(exc, OSError):
        # torch says only "unexpected pos"; a disk with no room left is by far the likeliest cause.
        try:
            full = shutil.disk_usage(path.parent).free < 1 << 20
        except OSError:
            full = False
        code = errno.ENOSPC if full else None
    why = os.strerror(code) if code else (str(exc).splitlines()[0].strip() or type(exc).__name__)
    fix = _FIXES.get(code, "check that the disk has room and that you may write there")
    return UserError(f"{path}: could not write ({why}); {fix}, then {then}")


@contextmanager
def writing(path: str | os.PathLike, then: str = "run the command again") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it is renamed to ``path`` when the block ends.

    Whatever stops the block (an error, Ctrl-C) removes the temporary file; a refused write is raised as
    :func:`write_error`'s :class:`UserError`, ``then`` saying how to go on (``ussf cv --resume RUN``).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        # Judged before the temporary file goes: with it still there, a disk it filled still reads as full.
        error = write_error(path, exc, then) if isinstance(exc, Exception) and _write_failure(exc) else None
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if error is not None:
            raise error from None
        raise


def write_text(path: str | os.PathLike, text: str, then: str = "run the command again") -> None:
    """Write ``text`` (UTF-8) to ``path`` whole (:func:`writing`)."""
    with writing(path, then) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(frame: Any, path: str | os.PathLike, then: str = "run the command again", **kwargs: Any) -> None:
    """``frame.to_csv(path, **kwargs)`` (``index=False`` unless given), written whole (:func:`writing`)."""
    kwargs.setdefault("index", False)
    with writing(path, then) as tmp:
        frame.to_csv(tmp, **kwargs)


def remove_temp_files(folder: str | os.PathLike, pattern: str = TEMP_GLOB, depth: int = 2) -> int:
    """Delete the temporary files (``.NAME.tmp...``) in ``folder`` and its sub-folders down to ``depth`` levels;
    returns how many. Call it holding :func:`run_lock`: then no other process is writing them."""
    folder = Path(folder)
    removed = 0
    levels = [folder]
    for _ in range(depth + 1):
        nxt = []
        for level in levels:
            try:
                entries = list(level.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.match(pattern) and not entry.is_dir():
                    try:
                        entry.unlink()
                        removed += 1
                    except FileNotFoundError:
                        pass
                elif entry.is_dir() and not entry.is_symlink():
                    nxt.append(entry)
        levels = nxt
    return removed


# ------------------------------------------------------------------------------------------------ the lock

_held: dict[str, list[int]] = {}  # resolved folder -> [fd, depth]: a process may re-enter its own lock
_held_guard = threading.Lock()


def lock_holder(folder: str | os.PathLike) -> str | None:
    """``pid@host`` written in ``folder``'s lock file, or ``None`` when there is none (or it is empty)."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def _describe(holder: str | None) -> str:
    if not holder or "@" not in holder:
        return "another process"
    pid, _, host = holder.partition("@")
    return f"process {pid} on {host}"


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock (``FOLDER/.lock``, created here and removed on release) while the block runs.

    A folder another live process holds is a :class:`UserError` naming its PID and host. A lock file left by a
    killed process is not obeyed: the system released its ``flock`` when the process died. The same process may
    enter the lock again (``ussf cv`` writes its report under its own lock). ``folder`` must exist.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unguarded
        yield
        return
    folder = Path(folder)
    key = str(folder.resolve())
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    lock = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(lock, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise write_error(lock, exc) from None
            who = _describe(lock_holder(folder))
            raise UserError(f"{folder}: in use by {who} (see {lock}); wait for it to finish, or stop it, then run "
                            "this again") from None
        # The holder before us may have removed the file between our open and our lock: lock the file in place.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
    except OSError:
        pass  # a full disk: the lock holds all the same, only its holder goes unnamed
    with _held_guard:
        _held[key] = [fd, 0]
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        try:
            os.unlink(lock)  # while still locked: a process that opened it meanwhile sees it is gone, and retries
        except OSError:
            pass
        os.close(fd)


def is_ours(name: str) -> bool:
    """Whether a file name in a run folder is this module's bookkeeping (the lock, a temporary file), not output."""
    return name == LOCK_NAME or (name.startswith(".") and ".tmp" in name)
