"""The compose file, the Kubernetes manifests and the Dockerfile hold together.

No Docker engine or cluster is needed: every `fedldm` command in them is parsed by the real
argument parser, and every referenced path, port, volume, secret key and environment variable is
checked against what defines it (the Dockerfile's COPY lines, generate.sh's outputs, declared
volumes, ConfigMaps, Services).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from cli.main import build_parser

yaml = pytest.importorskip("yaml", reason="PyYAML (a Flower dependency) is needed to parse "
                           "deploy/compose.yml and deploy/k8s/*.yaml")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = {p.stem: p for p in (DEPLOY / "k8s").glob("*.yaml")}
CERT_FILES = {"ca.crt", "superlink.crt", "superlink.key"}


def parse_fedldm(argv: list[str], where: str) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{where}: `fedldm {' '.join(argv)}` is not a valid command") from e


def _dockerfile_copies() -> dict[str, Path]:
    """Image path under /app -> repository path, from the Dockerfile's COPY lines."""
    out: dict[str, Path] = {}
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"COPY\s+(.+)\s+(\S+)$", line.strip())
        if not m:
            continue
        *sources, dest = m.group(0).split()[1:]
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, missing in the repository"
            target = "/app/" + (src if dest in ("./", ".") else dest.removeprefix("./"))
            out[target.rstrip("/")] = REPO / src
    return out


def test_dockerfile_copies_exist_and_runs_fedldm() -> None:
    copies = _dockerfile_copies()
    allowed = [ln[1:] for ln in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
               .splitlines() if ln.startswith("!")]
    for src in copies.values():
        rel = str(src.relative_to(REPO))
        assert any(rel == a or a.startswith(rel + "/") or a == rel + "/**" for a in allowed), \
            f"{rel} is copied by the Dockerfile but filtered out by Dockerfile.dockerignore"
    assert "/app/pyproject.toml" in copies and "/app/server" in copies
    text = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["tini", "--", "fedldm"]' in text
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M), "CPU by default, CUDA via --build-arg"
    assert "${VARIANT}" in text
    assert re.search(r"^USER 10001$", text, re.M)


# ---------------------------------------------------------------------------------------------
# compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, with the default (every variable must have one)."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(2) is not None, f"{COMPOSE}: ${{{m.group(1)}}} has no default"
        return m.group(2)
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", sub, value)


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    out = {}
    for v in service.get("volumes", []):
        name, target, *mode = v.split(":")
        out[target] = (name, bool(mode) and mode[0] == "ro")
    return out


def _certs_outputs(compose: dict[str, Any]) -> set[str]:
    cmd = compose["services"]["certs"]["command"]
    sites = cmd[cmd.index("--sites") + 1].split(",")
    return CERT_FILES | {f"sites/{s}/auth.key" for s in sites} | {
        f"sites/{s}/auth.key.pub" for s in sites}


def test_compose_variables_have_defaults_and_are_documented(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    header = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    names = set(re.findall(r"\$\{(\w+)", text))
    assert names, "expected configurable variables"
    for name in names:
        assert re.search(r"\$\{" + name + r":-[^}]+\}", text), f"${{{name}}} needs a default"
        assert name in header, f"{name} is not documented in the compose file's header"


def test_compose_build_and_volumes(compose: dict[str, Any]) -> None:
    build = compose["services"]["certs"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    declared = set(compose["volumes"])
    images = {svc["image"] for svc in compose["services"].values()}
    assert images == {compose["services"]["certs"]["image"]}, "one image, built once"
    for name, svc in compose["services"].items():
        assert ("build" in svc) == (name == "certs"), name
        assert svc["pull_policy"] == ("build" if name == "certs" else "never"), name
        for vol, _ in _mounts(svc).values():
            assert vol in declared, f"service {name} mounts undeclared volume {vol}"


def test_compose_commands_paths_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    copies = _dockerfile_copies()
    certs_out = _certs_outputs(compose)
    coord = parse_fedldm([_interpolate(a) for a in services["coordinator"]["command"]],
                         "compose coordinator")
    assert coord.coordinator_command == "start" and not coord.insecure
    assert coord.host == "0.0.0.0", "the proxy must be reachable from the site containers"
    # Only the Fleet-only proxy is published; the SuperLink's own port never is.
    published = services["coordinator"]["ports"]
    assert published and all(_interpolate(p).endswith(f":{coord.port}") for p in published)
    assert not any(f":{coord.local_port}" in _interpolate(p) for p in published)
    health = services["coordinator"]["healthcheck"]["test"]
    assert health[:2] == ["CMD", "fedldm"]
    h = parse_fedldm(health[2:], "compose healthcheck")
    assert h.superlink == f"127.0.0.1:{coord.local_port}"  # runs inside the coordinator
    san_hosts = services["certs"]["command"][services["certs"]["command"].index("--hosts") + 1]

    entry = services["certs"]["entrypoint"]
    assert entry[1] in copies or any(entry[1].startswith(k + "/") for k in copies)
    assert (REPO / entry[1].removeprefix("/app/")).is_file()

    site_ids = []
    for name, svc in services.items():
        if not name.startswith("site-"):
            continue
        args = parse_fedldm([_interpolate(a) for a in svc["command"]], f"compose {name}")
        assert args.site_command == "start" and not args.insecure
        site_ids.append(args.site_id)
        host, port = args.superlink.rsplit(":", 1)
        assert host in services and int(port) == coord.port, f"{name}: {args.superlink}"
        assert host in san_hosts.split(","), f"{host} missing from the certificate's --hosts"
        mounts = _mounts(svc)
        assert mounts["/data"][1], f"{name} must mount its data read-only"
        assert mounts["/certs"][1], f"{name} must mount the certificates read-only"
        for path in (args.data, args.state_dir, args.root_certificates, args.auth_key):
            mount = next((m for m in mounts if str(path).startswith(m)), None)
            assert mount is not None, f"{name}: {path} is not on a mounted volume"
            if mount == "/certs" and path != Path("/certs"):
                assert str(path.relative_to("/certs")) in certs_out, f"{name}: {path}"
        data_job = services[f"data-{name.split('-')[1]}"]
        assert _mounts(data_job)["/data"][0] == mounts["/data"][0]
        assert parse_fedldm(data_job["command"], f"compose {name} data").command == "demo-data"
        assert set(svc["depends_on"]) == {"register", f"data-{name.split('-')[1]}"}
    register = services["register"]["command"][0]
    loop = re.search(r"for s in ([\w\s-]+?); do", register).group(1).split()
    assert sorted(loop) == sorted(site_ids)
    assert {f"sites/{s}/auth.key.pub" for s in loop} <= certs_out
    # The Control API is only on the coordinator's loopback: register from its network namespace.
    assert services["register"]["network_mode"] == "service:coordinator"
    assert f"--superlink 127.0.0.1:{coord.local_port}" in register
    for name, svc in services.items():
        if name != "register" and "command" in svc:
            assert f":{coord.local_port}" not in " ".join(map(str, svc["command"])), name


# ---------------------------------------------------------------------------------------------
# kubernetes


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S[name].read_text()) if d]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _created_secret_keys(name: str, secret: str) -> set[str]:
    """Keys of a Secret as the manifest's header tells the operator to create it."""
    text = K8S[name].read_text()
    m = re.search(r"create secret \w+ " + secret + r"((?:[^\n]|\n#\s+)*)", text)
    assert m, f"{K8S[name]}: no `kubectl create secret ... {secret}` instruction"
    keys = set(re.findall(r"--from-file=([\w.]+)=", m.group(1)))
    if "secret tls" in m.group(0):
        keys |= {"tls.crt", "tls.key"}
    return keys


@pytest.mark.parametrize("name", ["coordinator", "site"])
def test_k8s_workload_references_resolve(name: str) -> None:
    docs = _docs(name)
    workload = next(d for d in docs if d["kind"] in ("StatefulSet", "Deployment"))
    spec = workload["spec"]
    assert spec["replicas"] == 1
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    configmaps = {d["metadata"]["name"]: d["data"] for d in _by_kind(docs, "ConfigMap")}
    pvcs = {d["metadata"]["name"] for d in _by_kind(docs, "PersistentVolumeClaim")}
    header = K8S[name].read_text()
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for m in mounts.values():
        assert m["name"] in volumes or m["name"] in claims, f"{name}: volume {m['name']}"
    for v in volumes.values():
        if "secret" in v:
            created = _created_secret_keys(name, v["secret"]["secretName"])
            assert {i["key"] for i in v["secret"]["items"]} <= created, f"{name}: {v}"
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            assert claim in pvcs or claim in header.split("#", 1)[-1], f"{name}: {claim}"

    env = {}
    for e in container["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["key"] in configmaps[ref["name"]], f"{name}: {ref}"
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]
        else:
            env[e["name"]] = e["value"]

    def expand(arg: str) -> str:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"{name}: $({var}) is used in args but not defined in env"
        return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)

    args = parse_fedldm([expand(a) for a in container["args"]], f"k8s {name}")
    for path in vars(args).values():
        if isinstance(path, Path) and path.is_absolute():
            mount = next((m for m in mounts if str(path).startswith(m)), None)
            assert mount is not None, f"{name}: {path} is not on a mounted volume"
            if "secret" in volumes.get(mounts[mount]["name"], {}):
                items = {i["path"] for i in volumes[mounts[mount]["name"]]["secret"]["items"]}
                if path != Path(mount):
                    assert str(path.relative_to(mount)) in items, f"{name}: {path}"
    if name == "coordinator":
        _check_coordinator(args, container, docs)
    else:
        _check_site(args, docs, mounts)


def _check_coordinator(args: argparse.Namespace, container: dict[str, Any],
                       docs: list[dict[str, Any]]) -> None:
    assert args.coordinator_command == "start" and not args.insecure
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The one container port is the Fleet-only proxy; the SuperLink's port stays on loopback.
    assert ports == {"fleet": args.port} and args.local_port != args.port
    assert container["readinessProbe"]["tcpSocket"]["port"] in ports
    (svc,) = _by_kind(docs, "Service")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for p in svc_ports.values():
        assert p["targetPort"] in ports
    (ingress,) = _by_kind(docs, "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert [p["path"] for p in paths] == ["/v1/fleet/"], "expose only the Fleet API"
    for p in paths:
        backend = p["backend"]["service"]
        assert backend["name"] == svc["metadata"]["name"]
        assert backend["port"]["name"] in svc_ports
    for tls in ingress["spec"]["tls"]:
        assert tls["secretName"] in K8S["coordinator"].read_text().split("apiVersion", 1)[0]


def _check_site(args: argparse.Namespace, docs: list[dict[str, Any]],
                mounts: dict[str, Any]) -> None:
    assert args.site_command == "start" and not args.insecure
    assert mounts["/data"]["readOnly"] is True
    (policy,) = _by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"] == []
    port = int(args.superlink.rsplit(":", 1)[1])
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert port in egress_ports, "the NetworkPolicy must allow the SuperLink's port"
