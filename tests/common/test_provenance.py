"""Which code made a run: the commit must be the checkout's, and absence must be said, not
guessed."""

import subprocess
from pathlib import Path

import pytest

from common.provenance import code_commit, code_version

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A folder git treats as outside any repository, whatever the caller's environment."""
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    return work


def test_the_commit_is_the_checkouts_own() -> None:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"{ROOT} is not a readable git checkout here")
    commit = code_commit(ROOT)
    assert commit is not None and commit.removesuffix("+changes") == done.stdout.strip()
    assert code_version(ROOT).startswith("fedldm ") and f"commit {commit}" in code_version(ROOT)


def test_a_tracked_change_is_flagged(isolated_git: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(isolated_git), "-c", "user.name=t", "-c",
                        "user.email=t@t", "-c", "commit.gpgsign=false", *args], check=True,
                       capture_output=True)

    git("init", "-q")
    (isolated_git / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-qm", "x")
    clean = code_commit(isolated_git)
    assert clean is not None and "+" not in clean
    (isolated_git / "new.txt").write_text("untracked files do not count\n")
    assert code_commit(isolated_git) == clean
    (isolated_git / "f.txt").write_text("b\n")
    assert code_commit(isolated_git) == clean + "+changes"
    # a folder inside the checkout (an installed copy in a venv there) is not the checkout
    (isolated_git / "site-packages").mkdir()
    assert code_commit(isolated_git / "site-packages") is None


def test_outside_a_checkout_it_says_so(isolated_git: Path) -> None:
    assert code_commit(isolated_git) is None
    assert code_version(isolated_git).endswith("commit unknown (not run from a git checkout, "
                                               "or git could not read it)")
