"""What keeps a main job's output folder consistent: one job at a time (a lock naming its holder), and the
checksum of every stage's outputs, so a resumed job notices a file that changed since its stage completed."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["OutputLock", "FolderInUseError", "file_digest", "digests", "changed_files"]

LOCK_FILE = ".lock"


class FolderInUseError(BlockingIOError):
    """Another job holds the output folder."""


class OutputLock:
    """An exclusive, non-blocking lock on an output folder (``<folder>/.lock``), held for a ``with`` block.

    The lock is an ``fcntl`` lock on the file, so it is released by the operating system when the holder exits,
    even when it is killed; the file keeps the last holder's pid, host and start time for the message of a refused
    second job.

    Args:
        folder: the output folder (created).

    Raises:
        FolderInUseError: on entering, when another process holds the lock (names its pid, host and start time).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._stream: Any = None

    def __enter__(self) -> OutputLock:
        os.makedirs(self.folder, exist_ok=True)
        stream = open(self.path, "a+")
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            stream.seek(0)
            holder = stream.read().strip() or "another process"
            stream.close()
            raise FolderInUseError(
                f"{self.folder} is in use by {holder}; wait for it to finish or use another output folder."
            ) from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        stream.flush()
        self._stream = stream
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._stream is not None:
            fcntl.flock(self._stream.fileno(), fcntl.LOCK_UN)
            self._stream.close()
            self._stream = None


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def digests(folder: str, relative_paths: Iterable[str]) -> dict[str, str]:
    """``{relative path: SHA-256}`` of files under ``folder``."""
    return {path: file_digest(os.path.join(folder, path)) for path in relative_paths}


def changed_files(folder: str, recorded: dict[str, str]) -> list[str]:
    """The recorded files that are missing or whose content differs from their recorded digest."""
    changed = []
    for path, digest in recorded.items():
        full = os.path.join(folder, path)
        if not os.path.isfile(full) or file_digest(full) != digest:
            changed.append(path)
    return changed


def dump_json(path: str, payload: Any) -> None:
    """Write JSON atomically (temporary file + ``os.replace``)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as stream:
        json.dump(payload, stream, indent=2)
    os.replace(temporary, path)
