"""Real peers started on ephemeral loopback ports: Orthanc (a PACS) for tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_echo(port: int, aet: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = subprocess.run(["echoscu", "-to", "2", "-aec", aet, "127.0.0.1", str(port)],
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aet} on port {port} never answered C-ECHO")


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout_s``."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class TCPListener:
    """A loopback listener on a free port: each accepted connection that ``admit`` lets in is
    handed to ``on_connection`` on its own thread. The base of the tests' TCP relays; a subclass
    sets its own attributes before calling ``__init__``, which starts accepting."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.admit(client):
                threading.Thread(target=self.on_connection, args=(client,), daemon=True).start()

    def admit(self, client: socket.socket) -> bool:
        return True

    def on_connection(self, client: socket.socket) -> None:
        raise NotImplementedError


class StoreSCP:
    """DCMTK ``storescp`` as a PACS (AE ``PACS``) writing into ``out``; ``opts`` are passed on
    (``--refuse``, ``--reject``...), ``port`` fixes the port (a PACS coming back where it was)."""

    def __init__(self, out: Path, *opts: str, port: int | None = None) -> None:
        from tests.conftest import require_tool

        require_tool("storescp", "dcmtk")
        self.port = port or free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.proc: subprocess.Popen[Any] | None = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-od", str(out), *opts, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        if "--refuse" not in opts:
            wait_echo(self.port, "PACS")
        else:  # a refusing storescp answers no echo: give it time to listen
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=10)
        self.proc = None

    def dest(self) -> Any:
        from triage_agent.config import DestinationConfig

        return DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=self.port)


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc with a temporary config: loopback HTTP, no auth, fsync'd storage, any AE may store.

    ``stop()`` and ``start()`` keep the ports and the data, so a test can take the PACS down
    during delivery and bring it back. ``dicomweb=True`` loads the DICOMweb plugin (STOW-RS at
    ``dicomweb_url``); ``settings`` override configuration keys (authentication, Lua scripts).
    """

    aet = "ORTHANC"

    def __init__(self, work: Path, *, dicomweb: bool = False, **settings: Any) -> None:
        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc not found: apt-get install orthanc")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            raise RuntimeError(f"{DICOMWEB_PLUGIN} not found: apt-get install orthanc-dicomweb")
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        cfg: dict[str, Any] = {
            "Name": "test-pacs", "StorageDirectory": str(work / "db"),
            "IndexDirectory": str(work / "db"), "DicomAet": self.aet, "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "SyncStorageArea": True, "StorageCompression": False, "Plugins": [],
            "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False,
        }
        if dicomweb:
            cfg["Plugins"] = [str(DICOMWEB_PLUGIN)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        cfg.update(settings)
        self.dicomweb_url = f"http://127.0.0.1:{self.http_port}/dicom-web"
        self.config = work / "orthanc.json"
        self.config.write_text(json.dumps(cfg))

    def start(self) -> Orthanc:
        # Debian's Orthanc links the system DCMTK, which leaves Nagle's algorithm on unless
        # TCP_NODELAY=1 is set (upstream builds set it at compile time): without it every C-STORE
        # answer waits ~40 ms for the delayed ACK, which would flatter anything compared with it.
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / "orthanc.log", "a"),  # noqa: SIM115
                                     env={**os.environ, "TCP_NODELAY": "1"})
        wait_echo(self.port, self.aet)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """MainDicomTags of every series Orthanc holds for a study, with their instance ids."""
        out = []
        for sid in self.get("/studies"):
            study = self.get(f"/studies/{sid}")
            if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
                continue
            for ser in study["Series"]:
                info = self.get(f"/series/{ser}")
                out.append({**info["MainDicomTags"], "Instances": info["Instances"]})
        return out

    def instance_file(self, instance_id: str) -> bytes:
        data = self.get(f"/instances/{instance_id}/file")
        assert isinstance(data, bytes)
        return data
