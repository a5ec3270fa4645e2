"""Fixtures: real peers (DCMTK, PostgreSQL) and the node as a subprocess on an ephemeral port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path(
    "/usr/lib/postgresql"
).exists() else None


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {package} (see .ci/run)")
    return path


def wait_for(pred: Any, timeout_s: float, what: str, interval_s: float = 0.3) -> Any:
    """Poll ``pred`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- PostgreSQL


class PgServer:
    """A PostgreSQL server: $TRIAGE_TEST_PG_URL if set, else a private throw-away cluster."""

    def __init__(self, base_url: str, proc_dir: Path | None = None) -> None:
        self.base_url = base_url
        self.proc_dir = proc_dir

    def new_database(self) -> str:
        import sqlalchemy as sa

        name = f"t_{uuid.uuid4().hex[:12]}"
        eng = sa.create_engine(self.base_url, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        return self.base_url.rsplit("/", 1)[0] + "/" + name


class PrivateCluster:
    """A throw-away PostgreSQL cluster on an ephemeral port that a test may stop and start."""

    def __init__(self) -> None:
        if PG_BIN is None or not (PG_BIN / "initdb").exists():
            pytest.fail("PostgreSQL not found: apt-get install postgresql, or set "
                        "TRIAGE_TEST_PG_URL")
        # pytest's temp dirs are private to root; the cluster needs a folder postgres can own.
        self.top = Path(tempfile.mkdtemp(prefix="triage-pg-"))
        self.data = self.top / "data"
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
            shutil.chown(self.top, "postgres", "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.run_as, str(PG_BIN / "initdb"), "-D", str(self.data), "-A",
                        "trust", "-U", "postgres", "--no-sync"], check=True, capture_output=True)
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _ctl(self, *args: str) -> None:
        assert PG_BIN is not None
        subprocess.run([*self.run_as, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._ctl("-o", opts, "-w", "-l", str(self.data / "log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    url = os.environ.get("TRIAGE_TEST_PG_URL")
    if url:
        yield PgServer(url)
        return
    cluster = PrivateCluster()
    try:
        yield PgServer(cluster.url, cluster.data)
    finally:
        cluster.destroy()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def sessions(db_url: str) -> Iterator[Any]:
    """Sessions on a freshly migrated database of each kind."""
    from triage_agent import db

    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    yield db.session_factory(engine)
    engine.dispose()


# ----------------------------------------------------------------------------- the node


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 destinations: list[dict[str, Any]] | None = None,
                 hl7_destinations: list[dict[str, Any]] | None = None) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
    for table, entries in (("destinations", destinations), ("hl7_destinations", hl7_destinations)):
        for dest in entries or []:
            lines.append(f"[[{table}]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in dest.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Node:
    """`triage-agent serve` in a subprocess; logs go to ``log_path`` for PHI checks."""

    def __init__(self, workdir: Path, db_url: str, **overrides: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        sections: dict[str, dict[str, Any]] = {
            "node": {"port": 0, "bind_address": "127.0.0.1", "ae_title": "TRIAGE"},
            "storage": {"root": str(workdir / "storage")},
            "database": {"url": db_url},
            "series": {"quiet_period_s": 1.0, "sweep_interval_s": 0.2},
            "worker": {"count": 0},
            "http": {"port": 0},
        }
        for k, v in overrides.items():
            if v is not None:
                sections.setdefault(k, {}).update(v)
        self.sections = sections
        self.destinations: list[dict[str, Any]] = []
        self.hl7_destinations: list[dict[str, Any]] = []
        self.config = write_config(workdir / "agent.toml", sections)
        self.db_url = db_url
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def storage_root(self) -> Path:
        return Path(self.sections["storage"]["root"])

    def add_destination(self, name: str, ae_title: str, host: str, port: int) -> None:
        self.destinations.append({"name": name, "ae_title": ae_title, "host": host, "port": port})
        write_config(self.config, self.sections, self.destinations, self.hl7_destinations)

    def add_hl7_destination(self, name: str, host: str, port: int) -> None:
        self.hl7_destinations.append({"name": name, "host": host, "port": port, "timeout_s": 5})
        write_config(self.config, self.sections, self.destinations, self.hl7_destinations)

    def start(self, timeout_s: float = 60.0) -> Node:
        log = open(self.log_path, "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triage_agent.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=log, text=True, cwd=self.workdir,
        )
        ready: list[str] = []

        def read() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                if line.startswith("READY"):
                    ready.append(line)
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout_s)
        if not ready:
            self.kill()
            raise RuntimeError(f"node did not start:\n{self.log_path.read_text()[-3000:]}")
        words = ready[0].split()
        self.port = int(words[words.index("port") + 1])
        self.http_port = int(words[words.index("http") + 1]) if "http" in words else 0
        return self

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "triage_agent.cli", *args, "--config", str(self.config)],
            capture_output=True, text=True, cwd=self.workdir, timeout=120,
        )

    def status(self) -> list[dict[str, Any]]:
        r = self.cli("status", "--json")
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_state(self, series_uid: str, states: set[str], timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            for rec in self.status():
                if rec["series_instance_uid"] == series_uid:
                    last = rec
                    if rec["state"] in states:
                        return rec
            time.sleep(0.3)
        raise AssertionError(f"series never reached {states}; last: {last}")

    def wait_all(self, n: int, states: set[str], timeout_s: float) -> list[dict[str, Any]]:
        """Status records once ``n`` series are all in ``states`` (the last seen on timeout)."""
        deadline = time.monotonic() + timeout_s
        recs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            recs = self.status()
            if len(recs) == n and all(r["state"] in states for r in recs):
                break
            time.sleep(0.5)
        return recs

    def session(self) -> Any:
        from triage_agent import db

        return db.session_factory(db.make_engine(self.db_url))


@pytest.fixture
def node_factory(tmp_path: Path, db_url: str) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(**overrides: dict[str, Any]) -> Node:
        n = Node(tmp_path / f"node{len(nodes)}", db_url, **overrides)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        with contextlib.suppress(Exception):
            n.stop(5)


@pytest.fixture
def node(node_factory: Any) -> Node:
    return node_factory().start()


def storescu(port: int, files: list[Path], *, called: str = "TRIAGE", calling: str = "MODALITY",
             extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [exe, "-aec", called, "-aet", calling, *(extra or []), "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"},
    )


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
