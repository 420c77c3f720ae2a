"""Which code produced a run: the package version and, in a git checkout, the commit.

A run folder outlives the code that wrote it. Results are compared across commits in
docs/benchmarks.md and a hospital's engineer asks "which version trained this model?" long after
the fact, so the coordinator records this string in state.json and metrics.json when a run
starts, and again whenever it is resumed by other code. Standard library only; a missing git
binary, a copy without `.git` or a slow filesystem give a shorter answer, never an error.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["code_commit", "code_version"]

_ROOT = Path(__file__).resolve().parent.parent  # the source tree this module was loaded from


def code_commit(root: Path = _ROOT) -> str | None:
    """The short commit of `root`'s git checkout, with "+changes" when tracked files differ
    from it; None when `root` is not in a checkout (an installed wheel) or git is missing."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("+changes" if dirty else "")


def code_version(root: Path = _ROOT) -> str:
    """E.g. ``fedldm 0.1.0, commit 78cfdcc+changes`` (``..., not a git checkout``)."""
    try:
        version = metadata.version("fedldm")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    commit = code_commit(root)
    return f"fedldm {version}, " + (f"commit {commit}" if commit else "not a git checkout")
