"""Which code produced a run: the package version and, in a git checkout, the commit.

A run folder outlives the code that wrote it. Results are compared across commits in
docs/benchmarks.md and a hospital's engineer asks "which version trained this model?" long after
the fact, so the coordinator records this string in state.json and metrics.json when a run
starts, and again whenever it is resumed by other code. Standard library only; a missing git
binary, an installed copy, a repository git refuses to read or a slow filesystem give a shorter
answer, never an error.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["code_commit", "code_version"]

_ROOT = Path(__file__).resolve().parent.parent  # the source tree this module was loaded from


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              errors="replace", timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit(root: Path = _ROOT) -> str | None:
    """The short commit of the git checkout whose top level is `root`, with "+changes" when
    tracked files differ from it ("+status-unknown" when git could not tell); None when
    `root` is not the top of a checkout (an installed copy, even one inside another
    repository's tree) or git cannot read it."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != root.resolve():
        return None
    head = _git(root, "rev-parse", "--short", "HEAD")
    if not head:
        return None
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return head + ("+status-unknown" if dirty is None else "+changes" if dirty else "")


def code_version(root: Path = _ROOT) -> str:
    """E.g. ``fedldm 0.1.0, commit 78cfdcc+changes`` (``..., commit unknown: ...``)."""
    try:
        version = metadata.version("fedldm")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    commit = code_commit(root)
    return f"fedldm {version}, " + (
        f"commit {commit}" if commit else
        "commit unknown (not run from a git checkout, or git could not read it)")
