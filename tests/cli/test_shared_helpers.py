"""The helpers every command shares: argument types (cli.args), the inf codec (common.jsonio)
and the atomic writer (common.files)."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from pathlib import Path

import pytest

from cli import args as A
from cli.main import main
from common import files, jsonio


@pytest.mark.parametrize(("text", "value"), [("inf", math.inf), ("INF", math.inf),
                                             ("infinity", math.inf), ("8", 8.0), ("0.5", 0.5)])
def test_epsilon_accepts_numbers_and_inf(text: str, value: float) -> None:
    assert A.epsilon(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "nan", "abc", ""])
def test_epsilon_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        A.epsilon(text)


@pytest.mark.parametrize(("text", "pair"), [("diffusion.rounds=8", ("diffusion.rounds", 8)),
                                            ("a.b=sgd", ("a.b", "sgd")),
                                            ("a.b=[1, 2]", ("a.b", [1, 2])),
                                            ("a.b=", ("a.b", ""))])
def test_override_reads_json_values(text: str, pair: tuple[str, object]) -> None:
    assert A.override(text) == pair


@pytest.mark.parametrize("text", ["nokey", "=3", " =3"])
def test_override_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="SECTION.FIELD=VALUE"):
        A.override(text)


def test_toml_value_writes_inf_as_a_string() -> None:
    assert [A.toml_value(v) for v in (math.inf, 1e-5, 3, True, "a b")] == [
        '"inf"', "1e-05", "3", "true", '"a b"']


def test_jsonio_round_trips_non_finite_floats() -> None:
    doc = {"eps": math.inf, "low": -math.inf, "x": (1.0, math.nan), 3: "inf-not"}
    text = jsonio.dumps(doc, sort_keys=True)
    assert "Infinity" not in text and "NaN" not in text
    back = jsonio.loads(text)
    assert back["eps"] == math.inf and back["low"] == -math.inf and math.isnan(back["x"][1])
    assert back["3"] == "inf-not"


def test_atomic_write_modes_and_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    files.write_json_atomic(path, {"eps": math.inf}, mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"eps": "inf"}
    os.chmod(path, 0o644)
    files.write_text_atomic(path, "new", mode=0o600)  # also when the file existed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "new"
    plain = files.write_bytes_atomic(tmp_path / "plain.bin", b"\x00\x01")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.bin", "secret.json"]


def test_failed_write_leaves_the_old_file(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        files.write_json_atomic(path, {"bad": object()})

    def crash(*_args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        files.write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "result"
    with pytest.raises(RuntimeError, match="crash"), files.staged_folder(final) as tmp:
        (tmp / "a.json").write_text("{}")
        raise RuntimeError("crash half-way")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with files.staged_folder(final) as tmp:
        (tmp / "a.json").write_text("{}")
        assert not final.exists()  # nothing under the final name until it is complete
    assert (final / "a.json").read_text() == "{}" and list(tmp_path.iterdir()) == [final]


def test_rare_class_and_float_list_arguments() -> None:
    assert A.rare_class("tumor:0.03") == ("tumor", 0.03)
    assert A.float_list("1, 2.5,4") == (1.0, 2.5, 4.0)
    for bad in ("tumor", "tumor:1.5", ":0.1", "tumor:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            A.rare_class(bad)
    for bad in ("", "1,x", "-1", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            A.float_list(bad)


def _flaky_child(tmp_path: Path, failures: int, text: str) -> list[str]:
    """A child that prints `text` and fails `failures` times, then succeeds (counts in a file)."""
    import sys

    counter = tmp_path / "starts"
    code = (f"import pathlib,sys; p=pathlib.Path({str(counter)!r}); "
            f"n=int(p.read_text()) if p.exists() else 0; p.write_text(str(n+1)); "
            f"print({text!r} if n < {failures} else 'activated', flush=True); "
            f"sys.exit(1 if n < {failures} else 0)")
    return [sys.executable, "-c", code]


def test_a_refused_activation_is_retried_until_the_old_session_expires(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from common.procs import run_supervised

    marker = "Failed to activate SuperNode"
    cmd = _flaky_child(tmp_path, 2, f"[code: 2004] {marker}.")
    assert run_supervised(cmd, dict(os.environ), retry_marker=marker, retry_every_s=0.05,
                          retry_for_s=30) == 0
    assert (tmp_path / "starts").read_text() == "3"
    out = capsys.readouterr()
    assert out.out.count(marker) == 2 and "activated" in out.out  # the child's log is shown
    assert "retrying" in out.err


def test_other_failures_and_a_spent_retry_window_end_the_site(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from common.procs import run_supervised

    marker = "Failed to activate SuperNode"
    other = _flaky_child(tmp_path / "a", 1, "certificate verify failed")
    (tmp_path / "a").mkdir()
    assert run_supervised(other, dict(os.environ), retry_marker=marker, retry_every_s=0.05) == 1
    assert (tmp_path / "a" / "starts").read_text() == "1"  # no retry for another error
    (tmp_path / "b").mkdir()
    stuck = _flaky_child(tmp_path / "b", 100, marker)
    assert run_supervised(stuck, dict(os.environ), retry_marker=marker, retry_every_s=0.2,
                          retry_for_s=0.5, retry_hint="Is the key registered?") == 1
    assert int((tmp_path / "b" / "starts").read_text()) <= 3
    assert "giving up. Is the key registered?" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "2  bad input" in out and "1  runtime failure" in out


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from cli import local

    def boom(_args: argparse.Namespace) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(local.COMMANDS, "demo-data", boom)
    assert main(["demo-data", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1].startswith("fedldm demo-data: unexpected error")


def test_demo_data_volumes_writes_the_demo3d_set(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`fedldm demo-data --volumes`: NIfTI head volumes with masks and a manifest that a 3D
    run reads; image-only options are refused with what to drop."""
    from ldm_core.data import holds_volumes, scan

    out = tmp_path / "d3"
    assert main(["demo-data", "--volumes", "--out", str(out), "--patients", "6", "--sites", "2",
                 "--image-size", "16"]) == 0
    records = scan(out).records
    assert len(records) == 6 and all(r.mask is not None for r in records)
    assert holds_volumes(out)
    assert main(["demo-data", "--volumes", "--out", str(tmp_path / "x"), "--slices",
                 "2"]) == 2
    assert "--volumes" in capsys.readouterr().err
