"""Which code made a run: the commit must be the checkout's, and absence must be said, not
guessed."""

import subprocess
from pathlib import Path

from common.provenance import code_commit, code_version

ROOT = Path(__file__).resolve().parents[2]


def test_the_commit_is_the_checkouts_own() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    commit = code_commit(ROOT)
    assert commit is not None and commit.removesuffix("+changes") == head
    assert code_version(ROOT).startswith("fedldm ") and f"commit {commit}" in code_version(ROOT)


def test_a_tracked_change_is_flagged(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    assert code_commit(tmp_path) is not None and "+" not in code_commit(tmp_path)
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert "+" not in code_commit(tmp_path)
    (tmp_path / "f.txt").write_text("b\n")
    assert code_commit(tmp_path).endswith("+changes")


def test_outside_a_checkout_it_says_so(tmp_path: Path) -> None:
    assert code_commit(tmp_path) is None
    assert code_version(tmp_path).endswith(", not a git checkout")
