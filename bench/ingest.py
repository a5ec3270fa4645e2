"""Ingest benchmark: the node against DCMTK storescp and Orthanc, measured in the same run.

The same 40-slice and 300-slice series (512x512, 16-bit) are sent with DCMTK ``storescu`` to:
  * the node (durability contract on: fsync file + rename + dir fsync + committed SQLite row),
  * DCMTK ``storescp`` (no fsync, no index: the speed ceiling),
  * Orthanc (fsync'd storage area and a SQLite index: the like-for-like durable peer).
Every DCMTK-based peer (storescu, storescp, Orthanc) runs with ``TCP_NODELAY=1``, so none is timed
waiting for delayed ACKs (Debian's DCMTK leaves Nagle's algorithm on without it).
Each receiver starts fresh for every run (so none short-circuits duplicates); the order of
receivers rotates between runs to spread machine noise. Prints the median wall time of
`storescu` per receiver and the ratios node/Orthanc and node/storescp.

    python bench/ingest.py [--runs 5] [--sizes 40,300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.factories import make_series  # noqa: E402
from tests.peers import Orthanc, free_port, stop_process, wait_echo  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


class Receiver:
    name = ""
    aet = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class Node(Receiver):
    name, aet = "node", "TRIAGE"

    def start(self) -> None:
        cfg = self.work / "agent.toml"
        cfg.write_text(
            f'[node]\nport = {self.port}\nbind_address = "127.0.0.1"\nmax_pdu_bytes = 0\n'
            f'[storage]\nroot = "{self.work / "storage"}"\n'
            f'[database]\nurl = "sqlite:///{self.work / "triage.db"}"\n'
            "[worker]\ncount = 0\n"
            "[http]\nport = 0\n"  # any free port: another node on this machine may hold 8080
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triage_agent.cli", "serve", "--config", str(cfg)],
            stdout=subprocess.DEVNULL, stderr=open(self.work / "node.log", "w"),  # noqa: SIM115
        )
        wait_echo(self.port, self.aet)


class StoreSCP(Receiver):
    name, aet = "storescp", "STORESCP"

    def start(self) -> None:
        out = self.work / "out"
        out.mkdir()
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.aet, "-od", str(out), "+B", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
        )
        wait_echo(self.port, self.aet)


class OrthancRx(Receiver):
    name, aet = "orthanc", "ORTHANC"

    def start(self) -> None:
        self.orthanc = Orthanc(self.work).start()
        self.port = self.orthanc.port

    def stop(self) -> None:
        self.orthanc.stop()


def load() -> str:
    """The 1/5/15-minute load averages (the receivers share the machine with whatever runs)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def send(rx: Receiver, files: list[Path]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aec", rx.aet, "-aet", "BENCH", "127.0.0.1", str(rx.port),
                        *map(str, files)], capture_output=True, text=True, env=ENV)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {rx.name} failed: {r.stderr[-500:]}")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="40,300")
    args = ap.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dcmtk orthanc")
    kinds = [Node, StoreSCP, OrthancRx]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        print(f"# ingest benchmark, {args.runs} runs per receiver; TCP_NODELAY=1 for storescu, "
              "storescp and Orthanc alike (DCMTK-based peers leave Nagle's algorithm on without "
              "it)")
        print(f"# {os.cpu_count()} CPUs; load average at start {load()}")
        print(f"{'series':>8} {'receiver':>9} {'median s':>9} {'inst/s':>8} {'MB/s':>7}")
        for n in (int(x) for x in args.sizes.split(",")):
            files = make_series(root / f"series{n}", n=n, seed=n, size=512)
            mb = sum(f.stat().st_size for f in files) / 1e6
            times: dict[str, list[float]] = {k.name: [] for k in kinds}
            for run in range(args.runs):
                order = kinds[run % 3:] + kinds[: run % 3]
                for kind in order:
                    work = root / f"{kind.name}-{n}-{run}"
                    work.mkdir()
                    rx = kind(work)
                    rx.start()
                    try:
                        times[kind.name].append(send(rx, files))
                    finally:
                        rx.stop()
                        shutil.rmtree(work, ignore_errors=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            for k, v in med.items():
                print(f"{n:>8} {k:>9} {v:>9.3f} {n / v:>8.1f} {mb / v:>7.1f}")
            print(f"{n:>8} ratio node/orthanc = {med['node'] / med['orthanc']:.2f}, "
                  f"node/storescp = {med['node'] / med['storescp']:.2f}")
        print(f"# load average at end {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
