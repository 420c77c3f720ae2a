"""Who may import whom (docs/architecture.md): checked on the source, without importing anything.

- ldm_core is the ML library: usable without Flower or the apps; from `common` it may use only
  the standard-library helpers `common.files` and `common.jsonio`.
- common is neutral: it imports neither client nor server (nor the CLI).
- server imports client only through the public names the simulation needs (SERVER_USES_CLIENT).
- the coordinator's CLI imports nothing from client/.
- benchmarks import no private name (`_x`) of the project.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"ldm_core", "common", "client", "server", "cli"}

# The public names of client that server code may import (simulation and offline evaluation).
SERVER_USES_CLIENT = {
    ("client.client_app", "SimulationSites"),
    ("client.client_app", "make_client_app"),
    ("client.ledger", "PrivacyLedger"),
    ("client.site_config", "SiteConfig"),
    ("client.tasks", "load_data"),
    ("client.tasks", "plan_for"),
    ("client.audit", "site_audit"),
    ("client.site_eval", "site_evaluate"),
    ("client.ledger", "BudgetExceededError"),
}
# What ldm_core may take from common.
LDM_USES_COMMON = {"common.files", "common.jsonio"}


def _imports(path: Path) -> set[str]:
    """Top-level package names imported by a file (anywhere in it, also inside functions)."""
    return {name.split(".")[0] for name, _ in _import_items(path)}


def _import_items(path: Path) -> set[tuple[str, str | None]]:
    """(module, name) pairs: `import a.b` -> ("a.b", None); `from a.b import c` -> ("a.b", "c");
    `from a import b` -> ("a", "b"). Relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    items: set[tuple[str, str | None]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            items.update((a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = list(path.relative_to(ROOT).with_suffix("").parts[:-node.level])
                module = ".".join([*parts, module] if module else parts)
            items.update((module, a.name) for a in node.names)
    return items


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def _ids(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("path", _files("ldm_core"), ids=_ids)
def test_ldm_core_never_imports_flwr(path: Path) -> None:
    items = _import_items(path)
    bad = {m.split(".")[0] for m, _ in items} & {"flwr", "client", "server", "cli"}
    assert not bad, f"{path} imports {bad}: ldm_core must not depend on Flower or the apps"
    used = {f"{m}.{n}" if m == "common" and n else m for m, n in items
            if m.split(".")[0] == "common"}
    assert used <= LDM_USES_COMMON, (f"{path} imports {sorted(used - LDM_USES_COMMON)} from "
                                     f"common; ldm_core may use only {sorted(LDM_USES_COMMON)}")


@pytest.mark.parametrize("path", _files("common"), ids=_ids)
def test_common_imports_neither_client_nor_server(path: Path) -> None:
    bad = _imports(path) & {"client", "server", "cli"}
    assert not bad, f"{path} imports {bad}: common is shared by both sides and must stay neutral"


@pytest.mark.parametrize("name", ["files", "jsonio", "procs", "tls", "__init__"])
def test_common_helpers_need_no_flower(name: str) -> None:
    bad = _imports(ROOT / "common" / f"{name}.py") & {"flwr", "torch", "ldm_core"}
    assert not bad, f"common/{name}.py imports {bad}; the shared helpers are standard library"


@pytest.mark.parametrize("path", _files("server"), ids=_ids)
def test_server_uses_only_public_simulation_names_of_client(path: Path) -> None:
    used = {(m, n) for m, n in _import_items(path) if m.split(".")[0] == "client"}
    private = sorted(f"{m}.{n}" for m, n in used if n and n.startswith("_"))
    assert not private, f"{path} imports private names of client: {private}"
    whole = sorted(m for m, n in used if n is None or m == "client")
    assert not whole, f"{path} imports client modules wholesale ({whole}); import names"
    extra = sorted(f"{m}.{n}" for m, n in used - SERVER_USES_CLIENT)
    assert not extra, (f"{path} imports {extra} from client; server may use only "
                       f"{sorted(SERVER_USES_CLIENT)} (extend the list in tests/test_layering.py "
                       "only for a public name the simulation really needs)")


def test_coordinator_cli_imports_nothing_from_client() -> None:
    bad = _imports(ROOT / "cli" / "coordinator.py") & {"client"}
    assert not bad, "the coordinator's CLI must not depend on the site's code"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=_ids)
def test_benchmarks_import_no_private_name(path: Path) -> None:
    private = sorted(f"{m}.{n}" for m, n in _import_items(path)
                     if m.split(".")[0] in PROJECT and n and n.startswith("_"))
    private += sorted(m for m, _ in _import_items(path)
                      if m.split(".")[0] in PROJECT and any(p.startswith("_")
                                                             for p in m.split(".")[1:]))
    assert not private, f"{path} imports private names: {private}"


def test_the_check_sees_an_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom flwr.app import Message\n")
    assert "flwr" in _imports(f)


def test_the_check_sees_names(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from client.tasks import _secret, load_data\nfrom common import files\n"
                 "def g():\n    import client.ledger\n")
    assert _import_items(f) == {("client.tasks", "_secret"), ("client.tasks", "load_data"),
                                ("common", "files"), ("client.ledger", None)}


def test_no_unsafe_torch_load() -> None:
    for pkg in ("ldm_core", "client", "server", "common", "cli"):
        for path in (ROOT / pkg).rglob("*.py"):
            for line in path.read_text().splitlines():
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path}: {line.strip()}"
