"""Durable file writes, implemented once: a crash leaves the old file or the new one, never half.

Why each step of `write_bytes_atomic`: the temp file in the same folder + `os.replace` means a
crash leaves the old or the new content, never a mix (a rename is atomic within one file
system); the fsync before the rename puts the new bytes on disk before the name points at them;
the fsync of the folder afterwards makes the rename itself durable.

`mode` sets the permission bits of the new file (e.g. 0o600 for a site's private files); the
bits are set on the temp file before any content is written, so the data is never readable by
others, not even for a moment. Without `mode` the file gets what `open()` would give it
(0o666 minus the umask). Imports only the standard library (and `common.jsonio`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import jsonio

__all__ = ["fsync_path", "staged_folder", "write_bytes_atomic", "write_text_atomic",
           "write_json_atomic"]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder by path (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode() -> int:
    """0o666 minus the umask, read without changing it where Linux allows (thread-safe)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None
                       ) -> Path:
    """Replace ``path`` with ``data``: temp file, flush, fsync, os.replace, fsync the folder.

    The folder must exist. On any error the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _default_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int | None = None,
                      encoding: str = "utf-8") -> Path:
    """`write_bytes_atomic` for text (UTF-8 by default; newlines are written as given)."""
    return write_bytes_atomic(path, text.encode(encoding), mode=mode)


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, mode: int | None = None,
                      indent: int | None = 2, sort_keys: bool = True) -> Path:
    """Strict JSON (inf/-inf/nan written as strings by `common.jsonio`), written atomically."""
    text = json.dumps(jsonio.encode(data), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text_atomic(path, text, mode=mode)


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a result folder beside ``final`` and rename it into place only when complete.

    Why: a crash half-way must not leave a half result under the final name (a later call
    would take it for a finished one and refuse to overwrite it). ``final`` must not exist or
    be an empty folder; the caller checks that, with its own message, before the slow work.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        if final.exists():
            final.rmdir()  # empty, or this raises and nothing is replaced
        tmp.rename(final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
