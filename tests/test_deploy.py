"""Deployment files (deploy/, docs/deploy.md): checked with the real validators where they exist.

* systemd units: ``systemd-analyze verify`` and ``systemd-analyze security --offline`` (skipped,
  with the reason, only where systemd-analyze is absent), plus the required settings.
* Dockerfiles: no Docker engine here, so the instructions are parsed and linted (pinned torch,
  non-root user, health check, ports...) and the HEALTHCHECK command is run against a real HTTP
  server.
* compose.yaml: ``docker compose config`` (v2 plugin) or ``docker-compose config`` (Debian's
  docker-compose), plus a structural check of the services and agent.compose.toml.
* Kubernetes: every manifest against the bundled OpenAPI schemas of ``kubernetes-validate``
  (strict: unknown fields fail), plus the cross-references between the objects.
* Every agent config under deploy/ must pass the agent's own ``load_config``.
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from triage_agent.config import AgentConfig, load_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
UNITS = ["triage-agent.service", "triage-agent-worker@.service"]
DROP_INS = ["cuda.conf", "port-104.conf"]
VENV_BIN = "/opt/triage-agent/.venv/bin/triage-agent"
CONFIG = "/etc/triage-agent/agent.toml"


def yaml_module() -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML not installed: pip install -e '.[dev]' (dev extra: PyYAML)")
    return yaml


def torch_pin() -> str:
    """The torch version the Makefile installs: every image must use the same."""
    m = re.search(r"torch==([0-9][0-9A-Za-z.+]*)", (REPO / "Makefile").read_text())
    assert m, "Makefile no longer pins torch==X: update tests/test_deploy.py"
    return m.group(1)


def check_agent_config(text: str, tmp_path: Path, name: str) -> AgentConfig:
    """The agent's own validation (the same as `triage-agent check-config`)."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_config(path)


# ---------------------------------------------------------------------------------------------
# systemd


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (systemd keys may repeat)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(path) if s == section and k == key]


def unit_value(path: Path, section: str, key: str) -> str | None:
    values = unit_values(path, section, key)
    return values[-1] if values else None


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_settings(unit: str) -> None:
    path = SYSTEMD / unit
    svc = "Service"
    command = "worker" if "worker" in unit else "serve"
    assert unit_value(path, svc, "ExecStart") == f"{VENV_BIN} {command} --config " + (
        CONFIG if command == "serve" else "/etc/triage-agent/worker.toml"
    )
    assert unit_value(path, svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    expected = {
        "User": "triage", "Group": "triage", "Restart": "on-failure", "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "LockPersonality": "yes",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictSUIDSGID": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert unit_value(path, svc, key) == value, f"{unit}: {key}= should be {value!r}"
    assert "/var/lib/triage-agent" in (unit_value(path, svc, "ReadWritePaths") or "").split()
    assert "@system-service" in unit_values(path, svc, "SystemCallFilter")
    # In-flight associations get 30 s in App.stop, then workers are joined: leave room for both.
    assert int(unit_value(path, svc, "TimeoutStopSec") or 0) >= 60
    # oneDNN's JIT needs writable+executable memory: W^X would break every convolution.
    assert unit_value(path, svc, "MemoryDenyWriteExecute") in (None, "no")
    # An invalid config (exit 2) is not retried in a loop.
    assert "2" in (unit_value(path, svc, "RestartPreventExitStatus") or "").split()


def test_systemd_drop_ins() -> None:
    cuda = SYSTEMD / "cuda.conf"
    assert unit_value(cuda, "Service", "PrivateDevices") == "no"
    assert unit_value(cuda, "Service", "DevicePolicy") == "closed"
    allowed = " ".join(unit_values(cuda, "Service", "DeviceAllow"))
    assert "/dev/nvidiactl" in allowed and "nvidia-uvm" in allowed
    port = SYSTEMD / "port-104.conf"
    assert unit_value(port, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert unit_value(port, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd): unit files "
                    "were checked structurally only")
    return path


def staged_units(tmp_path: Path, with_drop_ins: bool) -> Path:
    """The units in a temp folder, ExecStart pointing at a stub (the venv is not installed here).

    Everything else is verified as written, drop-ins included (systemd-analyze reads
    ``NAME.d/*.conf`` beside a unit file given by path).
    """
    stub = tmp_path / "bin" / "triage-agent"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / ("with-drop-ins" if with_drop_ins else "plain")
    units.mkdir()
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert VENV_BIN in text
        (units / name).write_text(text.replace(VENV_BIN, str(stub)))
        if with_drop_ins:
            d = units / f"{name}.d"
            d.mkdir()
            for conf in DROP_INS:
                shutil.copy(SYSTEMD / conf, d / conf)
    return units


@pytest.mark.parametrize("with_drop_ins", [False, True], ids=["plain", "drop-ins"])
def test_systemd_analyze_verify(tmp_path: Path, with_drop_ins: bool) -> None:
    tool = systemd_analyze()
    units = staged_units(tmp_path, with_drop_ins)
    proc = subprocess.run(
        [tool, "verify", "--man=no", *[f"./{u}" for u in UNITS]],
        cwd=units, capture_output=True, text=True, timeout=60,
    )
    out = (proc.stdout + proc.stderr).strip()
    # verify exits 0 on an unknown key or a bad value (it only warns): any output is a finding.
    assert proc.returncode == 0 and not out, out


def test_systemd_security_exposure(tmp_path: Path) -> None:
    tool = systemd_analyze()
    units = staged_units(tmp_path, with_drop_ins=False)
    for name in UNITS:
        # --threshold is in tenths of the printed score: 20 = "2.0 OK" (0 safe ... 10 unsafe).
        proc = subprocess.run(
            [tool, "security", "--offline=yes", "--threshold=20", f"./{name}"],
            cwd=units, capture_output=True, text=True, timeout=60,
        )
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        assert proc.returncode == 0, f"{name}: exposure above 2.0: {tail}"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: ends inside a continuation line"
    return out


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            out[k.strip()] = v.strip().strip('"')
    return out


DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lint(name: str) -> None:
    ins = dockerfile_instructions(DOCKER / name)
    words = [w for w, _ in ins]
    args = arg_defaults(ins)
    pin = torch_pin()

    # Base images: a named tag, never latest (ARG defaults resolved).
    for word, rest in ins:
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), "?"), image)
            assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
            assert image.startswith("python:3.11"), f"{name}: Python must match the project: {image}"

    # torch: exactly the Makefile's version; never an unpinned `pip install torch`.
    assert args.get("TORCH_VERSION") == pin, f"{name}: TORCH_VERSION should be {pin}"
    runs = [rest for word, rest in ins if word == "RUN"]
    torch_installs = [r for r in runs if re.search(r"pip install[^&;]*\btorch\b", r)]
    assert torch_installs, f"{name}: no torch install step"
    for r in torch_installs:
        for spec in re.findall(r"""["']?\btorch\b[^\s"';&]*""", r.split("pip install", 1)[1]):
            assert "==${TORCH_VERSION}" in spec or f"=={pin}" in spec, f"{name}: unpinned {spec}"
    project_install = [r for r in runs
                       if re.search(r"""pip install[^&;]*\s["']?\.(\[[\w,]+\])?["']?(\s|$)""", r)]
    assert project_install and all("--constraint" in r for r in project_install), (
        f"{name}: `pip install .` must keep the pinned torch (constraint file)")
    if name == "Dockerfile":
        assert args.get("TORCH_INDEX_URL", "").endswith("/whl/cpu"), "CPU image needs the CPU index"
    # The inline Python of the build steps at least compiles (the image cannot be built here).
    snippets = [t[i + 1] for r in runs for t in [shlex.split(r)] for i, w in enumerate(t[:-1])
                if w == "-c" and i > 0 and t[i - 1] == "python"]
    assert snippets, "the torch-version check of the build stage is gone"
    # The wheel carries its migrations: no build step copies them by hand any more.
    assert not any("MIGRATIONS_DIR" in code for code in snippets)
    for code in snippets:
        compile(code.replace("${TORCH_VERSION}", pin), f"{name} RUN python -c", "exec")

    # Runs as a fixed non-root uid; state in a volume; the two ports; a health check on /healthz.
    user = [rest for word, rest in ins if word == "USER"][-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 1000
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert ("VOLUME", '["/var/lib/triage-agent"]') in ins
    exposed = {p for word, rest in ins if word == "EXPOSE" for p in rest.split()}
    assert {"11112", "8080"} <= exposed
    assert words.count("HEALTHCHECK") == 1
    assert [json.loads(r) for w, r in ins if w == "ENTRYPOINT"] == [["triage-agent"]]
    assert [json.loads(r) for w, r in ins if w == "CMD"] == [["serve", "--config", CONFIG]]

    # Everything COPYed from the context exists and is let through the Dockerfile's ignore file.
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    assert "*" in ignore
    for word, rest in ins:
        if word == "COPY" and "--from=" not in rest:
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
                assert src.rstrip("/") in allowed, f"{name}: COPY {src} is excluded by .dockerignore"


def healthcheck_command(name: str) -> list[str]:
    ins = dockerfile_instructions(DOCKER / name)
    rest = next(r for w, r in ins if w == "HEALTHCHECK")
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
    assert m, f"{name}: HEALTHCHECK should use the exec form CMD [...]"
    cmd = json.loads(m.group(1))
    assert cmd[0] == "python" and "/healthz" in cmd[-1] and "127.0.0.1" in cmd[-1]
    return [sys.executable, *cmd[1:]]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def _serve(status: int) -> Iterator[int]:
    handler = type("H", (_Health,), {"status": status})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_healthcheck_runs(name: str) -> None:
    cmd = healthcheck_command(name)

    def run(url: str) -> int:
        env = {"TRIAGE_HEALTH_URL": url, "PATH": "/usr/bin:/bin"}
        return subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode

    for port in _serve(200):
        assert run(f"http://127.0.0.1:{port}/healthz") == 0
    for port in _serve(503):
        assert run(f"http://127.0.0.1:{port}/healthz") != 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert run(f"http://127.0.0.1:{closed}/healthz") != 0


def test_container_config_valid(tmp_path: Path) -> None:
    text = (DOCKER / "agent.container.toml").read_text()
    cfg = check_agent_config(text, tmp_path, "agent.toml")
    assert cfg.node.port == 11112 and cfg.http.port == 8080
    assert cfg.http.bind_address == "0.0.0.0", "the published port must reach the server"
    assert str(cfg.storage.root).startswith("/var/lib/triage-agent/")
    assert cfg.database.url == "sqlite:////var/lib/triage-agent/triage.db"


# ---------------------------------------------------------------------------------------------
# compose


def compose_doc() -> dict[str, Any]:
    return yaml_module().safe_load((DEPLOY / "compose.yaml").read_text())


def compose_tool() -> list[str]:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` found: "
                "apt-get install docker-compose (see .ci/run)")


def test_compose_config_passes_docker_compose() -> None:
    tool = compose_tool()
    proc = subprocess.run(
        [*tool, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _port_targets(service: dict[str, Any]) -> dict[int, str]:
    """container port -> host binding as written ("127.0.0.1:8080" or "11112")."""
    out = {}
    for p in service.get("ports", []):
        parts = str(p).split(":")
        out[int(parts[-1].split("/")[0])] = ":".join(parts[:-1])
    return out


def test_compose_structure(tmp_path: Path) -> None:
    doc = compose_doc()
    s = doc["services"]
    assert {"postgres", "orthanc", "agent", "worker"} <= set(s)

    pg = s["postgres"]
    assert re.fullmatch(r"postgres:15([.-].*)?", pg["image"]), pg["image"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg["volumes"])

    orthanc = s["orthanc"]
    image, _, tag = orthanc["image"].partition(":")
    assert image in ("orthancteam/orthanc", "jodogne/orthanc") and tag and tag != "latest"
    ocfg = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    assert any(v.startswith("./orthanc/orthanc.json:/etc/orthanc/") for v in orthanc["volumes"])
    assert ocfg["DicomAet"] == "ORTHANC" and ocfg["DicomAlwaysAllowStore"] is True

    agent, worker = s["agent"], s["worker"]
    for svc in (agent, worker):
        build = svc["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        assert "./agent.compose.toml:/etc/triage-agent/agent.toml:ro" in svc["volumes"]
        assert any(str(v).startswith("triage-data:/var/lib/triage-agent") for v in svc["volumes"])
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "PGPASSWORD" in svc["environment"]
    assert agent["command"][0] == "serve" and worker["command"][0] == "worker"
    assert worker["deploy"]["replicas"] >= 2
    assert "ports" not in worker, "scaled workers cannot share host ports"
    ports = _port_targets(agent)
    assert ports[11112] == "11112" and ports[8080] == "127.0.0.1:8080"
    assert {"pgdata", "triage-data"} <= set(doc["volumes"])
    # The same password for the server and the clients.
    assert pg["environment"]["POSTGRES_PASSWORD"] == agent["environment"]["PGPASSWORD"]

    # agent.compose.toml: valid for the agent and wired to this compose network.
    cfg = check_agent_config((DEPLOY / "agent.compose.toml").read_text(), tmp_path, "agent.toml")
    from sqlalchemy.engine import make_url

    url = make_url(cfg.database.url)
    assert url.get_backend_name() == "postgresql" and url.host == "postgres"
    assert url.password is None, "the password comes from PGPASSWORD, not the file"
    assert url.username == pg["environment"]["POSTGRES_USER"]
    assert url.database == pg["environment"]["POSTGRES_DB"]
    assert cfg.worker.count == 0
    assert cfg.node.port == 11112 and cfg.http.port == 8080 and cfg.http.bind_address == "0.0.0.0"
    (dest,) = cfg.destinations
    assert (dest.host, dest.port, dest.ae_title) == ("orthanc", ocfg["DicomPort"], ocfg["DicomAet"])
    # Orthanc knows the agent, so a study can be pushed from its UI to AE TRIAGE.
    assert ocfg["DicomModalities"]["triage"] == [cfg.node.ae_title, "agent", cfg.node.port]


# ---------------------------------------------------------------------------------------------
# Kubernetes


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    yaml = yaml_module()
    out = {}
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_k8s_manifests_schema() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate not installed: pip install -e '.[dev]' "
                    "(dev extra: kubernetes-validate)")
    yaml = yaml_module()
    version = kubernetes_validate.latest_version()
    checked = 0
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']} {doc['metadata']['name']}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
            checked += 1
    assert checked >= 8


def test_k8s_schema_check_catches_typos() -> None:
    """The validator is strict: a misspelt field is an error, not silently dropped."""
    import kubernetes_validate

    doc = k8s_objects()[("Deployment", "triage-worker")]
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml_module().safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    top = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == top
    assert "secret.example.yaml" not in listed, "the Secret template must not be applied"


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def _probe_path(container: dict[str, Any], probe: str) -> str:
    return container[probe]["httpGet"]["path"]


def test_k8s_structure(tmp_path: Path) -> None:
    objs = k8s_objects()
    ns = objs[("Namespace", "triage")]["metadata"]["name"]
    for (kind, name), obj in objs.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == ns, f"{kind} {name}"

    cm = objs[("ConfigMap", "triage-agent-config")]
    cfg = check_agent_config(cm["data"]["agent.toml"], tmp_path, "agent.toml")
    assert cfg.worker.count == 0, "the receiver must not score ([worker] count = 0)"
    assert cfg.http.bind_address == "0.0.0.0", "probes reach the pod IP, not loopback"
    assert str(cfg.storage.root).startswith("/var/lib/triage-agent/")
    from sqlalchemy.engine import make_url

    url = make_url(cfg.database.url)
    assert url.get_backend_name() == "postgresql" and url.password is None
    assert ("Service", url.host) in objs, "optional/postgres.yaml should provide the DB host"

    secret = objs[("Secret", "triage-db")]
    pvc = objs[("PersistentVolumeClaim", "triage-storage")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    receiver = objs[("Deployment", "triage-receiver")]
    worker = objs[("Deployment", "triage-worker")]
    assert receiver["spec"]["replicas"] == 1 and worker["spec"]["replicas"] >= 2
    for dep in (receiver, worker):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = _pod(dep)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
        assert pod["terminationGracePeriodSeconds"] >= 60
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
        assert vols["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/etc/triage-agent"] == "config" and mounts["/tmp"] == "tmp"
            assert CONFIG in c["args"]
            env = {e["name"]: e for e in c["env"]}
            ref = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        main = pod["containers"][0]
        assert {m["mountPath"] for m in main["volumeMounts"]} >= {"/var/lib/triage-agent"}
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert ports["http"] == cfg.http.port
        assert _probe_path(main, "readinessProbe") == "/readyz"
        assert _probe_path(main, "livenessProbe") == "/healthz"

    rmain = _pod(receiver)["containers"][0]
    assert rmain["args"][0] == "serve"
    assert {p["name"]: p["containerPort"] for p in rmain["ports"]}["dicom"] == cfg.node.port
    assert _pod(worker)["containers"][0]["args"][0] == "worker"
    assert [c["args"][:2] for c in _pod(receiver)["initContainers"]] == [["db", "upgrade"]]

    svc = objs[("Service", "triage-dicom")]
    rlabels = receiver["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= rlabels.items()
    wlabels = worker["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= wlabels.items(), "workers take no DICOM"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 11112 and port["targetPort"] == "dicom"


# ---------------------------------------------------------------------------------------------
# docs


def test_deploy_doc_references_exist() -> None:
    doc = (REPO / "docs" / "deploy.md").read_text()
    refs = set(re.findall(r"(?<![\w/-])deploy/[\w./@-]*[\w@]", doc))
    # `deploy/triage-worker` is kubectl's Deployment syntax, not a path.
    refs = {r for r in refs if not re.fullmatch(r"deploy/triage-[a-z]+", r)}
    assert len(refs) >= 10
    for ref in sorted(refs):
        assert (REPO / ref).exists(), f"docs/deploy.md names {ref}, which does not exist"
    # Sizing numbers come from the benchmark, not from this document: placeholders until measured.
    assert "bench/model.py" in doc
    for term in ("FOR UPDATE SKIP LOCKED", "triage-agent db upgrade", "ReadWriteMany", "TLS"):
        assert term in doc


def test_every_deploy_config_is_a_toml_the_agent_accepts(tmp_path: Path) -> None:
    configs = sorted(DEPLOY.rglob("*.toml"))
    assert len(configs) >= 2
    for path in configs:
        tomllib.loads(path.read_text())
        check_agent_config(path.read_text(), tmp_path, path.name)
