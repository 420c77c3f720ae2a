"""ldm_core is the ML library: it must stay usable without Flower (DESIGN.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


LDM_FILES = sorted((ROOT / "ldm_core").rglob("*.py"))


@pytest.mark.parametrize("path", LDM_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_ldm_core_never_imports_flwr(path: Path) -> None:
    bad = _imports(path) & {"flwr", "client", "server"}
    assert not bad, f"{path} imports {bad}: ldm_core must not depend on Flower or the apps"


def test_the_check_sees_an_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom flwr.app import Message\n")
    assert "flwr" in _imports(f)


def test_no_unsafe_torch_load() -> None:
    for pkg in ("ldm_core", "client", "server"):
        for path in (ROOT / pkg).rglob("*.py"):
            for line in path.read_text().splitlines():
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path}: {line.strip()}"
