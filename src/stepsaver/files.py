"""Writing files so that a kill or a bad path never leaves half a file, and is found before the work.

Core and torch-free. :func:`check_output_file` proves an output path writable *before* minutes of
generation are spent (a path under a file, a directory, ``/proc``); :func:`write_atomically`
writes beside the target and renames, so readers see the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from stepsaver.errors import StepsaverError

__all__ = ["check_output_file", "exclusive_folder", "json_lookup", "json_memo", "read_json", "write_atomically"]


def check_output_file(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """Create ``path``'s folder and prove a file can be written there; one-line errors otherwise."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise StepsaverError(f"--out must be a {suffix} path, got {path}")
    if path.is_dir():
        example = path / f"image{suffix or ''}"
        raise StepsaverError(f"--out {path} is a directory; give a file name such as {example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise StepsaverError(f"cannot write {path}: {exc.strerror or exc}; choose another --out") from None
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, what: str = "run", wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the block; a second holder gets a one-line error
    (or, with ``wait``, blocks until the first lets go).

    ``flock`` on ``folder/.lock``: the kernel drops it when the holder exits or is killed, so a
    crashed run never leaves a stale lock. The file names the holder (pid, host, start time)
    for the error the second run prints.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text(encoding="utf-8", errors="replace").strip() or "another process"
            raise StepsaverError(f"{folder} is in use by another {what} ({holder}); wait for it to finish or "
                                 "use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield folder
    finally:
        os.close(fd)  # closing releases the lock



def read_json(path: str | os.PathLike, what: str = "config", missing_hint: str = "") -> object:
    """The JSON value in ``path``, or a one-line error naming ``what`` file it was and what is wrong."""
    import json

    p = Path(path)
    if not p.is_file():
        raise StepsaverError(f"{what} file {p} does not exist{missing_hint}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise StepsaverError(f"{what} file {p} is not valid JSON (line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StepsaverError(f"{what} file {p} cannot be read: {exc}") from None


def json_memo(path: str | os.PathLike, key: str, compute: Callable[[], object], replace: bool = False) -> object:
    """The value stored under ``key`` in the JSON object at ``path``, computing and adding it if absent.

    Why one helper: benchmarks memoise slow, deterministic results (calibrated ratios, quality
    scores) across runs and processes. The file is re-read just before writing and the new entry
    merged in (an entry another process wrote meanwhile wins, so two processes agree on one value),
    then replaced atomically; a torn or unreadable file counts as empty, never as an error.
    ``replace`` computes anew and overwrites the entry (a measurement the user asked to redo).
    """
    import json

    path = Path(path)
    found = _json_object(path)
    if key in found and not replace:
        return found[key]
    value = compute()
    merged = _json_object(path)
    merged[key] = value if replace else merged.get(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(merged, indent=1, sort_keys=True)))
    return merged[key]


def json_lookup(path: str | os.PathLike, key: str) -> object | None:
    """What :func:`json_memo` stored under ``key`` at ``path``, or ``None`` (nothing computed).

    Why: a benchmark that finds a row's results memoised can skip the renders the row would need,
    so it must ask before deciding to render; a torn or unreadable file reads as empty.
    """
    return _json_object(Path(path)).get(key)


def _json_object(path: Path) -> dict:
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
