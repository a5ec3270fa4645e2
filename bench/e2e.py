"""End-to-end latency: series complete / last instance -> results delivered to a real PACS.

Starts Orthanc and the node (SQLite, bundled model, one worker), sends N synthetic head-CT series
with DCMTK storescu, waits until every series is delivered, and prints p50/p95 of
  delivered - series complete          (what the node adds after the quiet period)
  delivered - last instance received   (what a radiologist waits, quiet period included)
next to the bare model time (read + preprocess + score, in-process) for the same series measured
in the same run, and the overhead ratio (delivered - complete) / bare model time.

    python bench/e2e.py [--series 6] [--matrix 512] [--quiet 2]

The burst of the issue's goal (four 40-slice series sent at the same time by four storescu
processes, the node with its default worker count and fast inference path) and one series alone:

    python bench/e2e.py --burst --series 4 --slices 40
    python bench/e2e.py --series 1 --slices 40

With ``--burst`` it also prints when the last series was delivered after the burst's last slice.
It sends once the node's workers are warm (model runtime built, output builders loaded), like a
node that has been running; ``--cold`` sends as soon as the node answers C-ECHO.
It always prints where the seconds of the last-delivered series went (quiet period, queue wait,
read, preprocess, model, outputs, delivery), from the node's own Result timings.

Peak memory of ``serve`` (its own high-water mark and the sampled sum over it and any child
processes) while four 300-slice series arrive at once:

    python bench/e2e.py --burst --series 4 --slices 300 --rss
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from triage_model.runtime import RUNTIMES  # noqa: E402

from tests.peers import Orthanc, free_port, wait_echo  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _proc_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (Linux /proc)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(v) for v in f[11:15]) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """The process and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return out


class RssSampler(threading.Thread):
    """Samples the summed resident memory of a process tree every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak_kib = 0
        self.peak_processes = 0
        self.hwm_kib = 0  # the kernel's high-water mark of the process itself
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            pids = _tree(self.pid)
            total = sum(_proc_kib(p, "VmRSS") for p in pids)
            if total > self.peak_kib:
                self.peak_kib, self.peak_processes = total, len(pids)
            self.hwm_kib = max(self.hwm_kib, _proc_kib(self.pid, "VmHWM"))

    def stop(self) -> None:
        self._done.set()
        self.join()


def _secs(a: str | None, b: str | None) -> float | None:
    """Seconds from ISO timestamp a to b (the Result timings' format)."""
    if not a or not b:
        return None
    return (dt.datetime.fromisoformat(b.rstrip("Z"))
            - dt.datetime.fromisoformat(a.rstrip("Z"))).total_seconds()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--quiet", type=float, default=2.0, help="[series] quiet_period_s")
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--burst", action="store_true",
                    help="send all series at once, one storescu each (latency then includes "
                         "queueing behind the other series); default: each series after the "
                         "previous is delivered")
    ap.add_argument("--slices", type=int, default=0,
                    help="keep the middle N slices of each series (default 0: all, about 35-65 "
                         "slices); above 64 the heads are scanned in thin slices so that each "
                         "series has N")
    ap.add_argument("--no-bare", action="store_true",
                    help="skip the in-process bare model timing after the run")
    ap.add_argument("--workers", type=int, default=None,
                    help="[worker] count of the node (default: its own, one per usable core)")
    ap.add_argument("--keep-log", type=Path, default=None, metavar="FILE",
                    help="copy the node's log here")
    ap.add_argument("--runtime", choices=RUNTIMES, default=None,
                    help="[model] runtime of the node (default: its own, fast)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="[model] batch_size of the node (default: its own)")
    ap.add_argument("--cold", dest="warm", action="store_false",
                    help="send as soon as the node answers C-ECHO, without waiting for its "
                         "workers to be warm (model runtime built, output builders loaded)")
    ap.add_argument("--rss", action="store_true",
                    help="sample the node's resident memory (with its child processes) and "
                         "print the peak")
    args = ap.parse_args(argv)

    from sqlalchemy import func, select
    from triage_model.sites import get_site
    from triage_model.synth import LESION_FAMILIES, make_case

    from triage_agent.synth_dicom import write_case_dicom

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        print(f"# generating {args.series} synthetic series ({args.matrix}x{args.matrix})",
              flush=True)
        series_files = []
        site = None
        if args.slices > 64:  # a thin-slice scanner; the head is about 160 mm long
            site = replace(get_site("D"), name="thin",
                           thickness_mm=(round(min(0.625, 150.0 / args.slices), 3),))
        for i in range(args.series):
            label = "normal" if i % 2 == 0 else LESION_FAMILIES[i % len(LESION_FAMILIES)]
            case = make_case(args.seed + i, label, matrix=args.matrix, site=site)
            print(f"#   series {i + 1}: {label}, {min(case.hu.shape[0], args.slices or 10**6)} "
                  "slices", flush=True)
            if args.slices and case.hu.shape[0] > args.slices:
                a = (case.hu.shape[0] - args.slices) // 2
                case.hu = case.hu[a:a + args.slices]
                case.lesion_mask = case.lesion_mask[a:a + args.slices]
            series_files.append(write_case_dicom(case, root / f"case{i}"))
        pacs = Orthanc(root / "orthanc").start()
        port = free_port()
        cfg = root / "agent.toml"
        cfg.write_text(
            f'[node]\nport = {port}\nbind_address = "127.0.0.1"\n'
            f'[storage]\nroot = "{root / "storage"}"\n'
            f'[database]\nurl = "sqlite:///{root / "triage.db"}"\n'
            f"[series]\nquiet_period_s = {args.quiet}\nsweep_interval_s = 0.2\n"
            "[worker]\npoll_interval_s = 0.1\n"
            + (f"count = {args.workers}\n" if args.workers is not None else "")
            + ("[model]\n" if args.runtime or args.batch_size else "")
            + (f'runtime = "{args.runtime}"\n' if args.runtime else "")
            + (f"batch_size = {args.batch_size}\n" if args.batch_size else "")
            + "[delivery]\ninterval_s = 0.2\n[http]\nport = 0\n"
            f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
            f"port = {pacs.port}\n"
        )
        node = subprocess.Popen(
            [sys.executable, "-m", "triage_agent.cli", "serve", "--config", str(cfg)],
            stdout=subprocess.DEVNULL, stderr=open(root / "node.log", "w"),  # noqa: SIM115
        )
        sampler = RssSampler(node.pid) if args.rss else None
        load_at_start = os.getloadavg()[0]
        try:
            wait_echo(port, "TRIAGE", timeout_s=120)
            # Like a node that has been running: its workers have built the model's runtime and
            # loaded the output builders.
            warm_deadline = time.monotonic() + 300
            while args.warm and time.monotonic() < warm_deadline:
                text = (root / "node.log").read_text(errors="replace")
                if "output builders ready" in text or "warm-up failed" in text:
                    break
                time.sleep(0.2)
            if sampler is not None:
                sampler.start()
            print("# sending", "all at once" if args.burst else "one series at a time",
                  flush=True)

            from triage_agent import db as tdb
            from triage_agent.models import Series as SeriesRow

            poll_engine = tdb.make_engine(f"sqlite:///{root / 'triage.db'}")

            def wait_done(n: int) -> None:
                # Polls the database in-process: a `triage-agent status` subprocess per poll
                # would steal a core from the node being measured.
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    with poll_engine.connect() as c:
                        states = [s for (s,) in c.execute(select(SeriesRow.state))]
                    if len(states) == n and all(s in ("delivered", "failed") for s in states):
                        return
                    time.sleep(0.2)
                sys.exit("not everything was delivered within 10 minutes; see node.log")

            def storescu(files: list[Path]) -> subprocess.Popen[bytes]:
                return subprocess.Popen(["storescu", "-aec", "TRIAGE", "127.0.0.1", str(port),
                                         *map(str, files)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL,
                                        env={**os.environ, "TCP_NODELAY": "1"})

            cpu_at_send = _cpu_s(node.pid)
            if args.burst:  # one association per series, all at the same time
                senders = [storescu(files) for files in series_files]
                if any(p.wait() for p in senders):
                    sys.exit("storescu failed")
            for i, files in enumerate([] if args.burst else series_files):
                if storescu(files).wait():
                    sys.exit("storescu failed")
                wait_done(i + 1)
            wait_done(args.series)
            node_cpu_s = _cpu_s(node.pid) - cpu_at_send
        finally:
            if sampler is not None:
                sampler.stop()
            node.terminate()
            node.wait(60)
            pacs.stop()
            if args.keep_log:
                args.keep_log.write_bytes((root / "node.log").read_bytes())


        from triage_agent import db
        from triage_agent.models import Delivery, Output, Result, Series

        engine = db.make_engine(f"sqlite:///{root / 'triage.db'}")
        after_complete, after_last, delivered_at, last_at = [], [], [], []
        stages: dict[str, list[float]] = {}
        with db.session_factory(engine)() as s:
            for (t,) in s.execute(select(Result.timings)):
                for k in ("prepare_wait_s", "read_s", "preprocess_s", "model_wait_s", "model_s",
                          "outputs_s"):
                    if k in t:
                        stages.setdefault(k, []).append(float(t[k]))
            rows = s.execute(
                select(Series.completed_at, Series.last_received_at, Series.state,
                       func.max(Delivery.delivered_at), Result.id)
                .join(Result, Result.series_id == Series.id)
                .join(Output, Output.result_id == Result.id)
                .join(Delivery, Delivery.output_id == Output.id)
                .group_by(Series.id, Result.id)
            ).all()
            timings_of: dict[int, dict] = dict(s.execute(select(Result.id, Result.timings)).all())
        engine.dispose()
        last_series: tuple[dt.datetime, dict] | None = None
        for completed, last, state, delivered, result_id in rows:
            if state != "delivered" or delivered is None:
                continue
            after_complete.append((delivered - completed).total_seconds())
            after_last.append((delivered - last).total_seconds())
            delivered_at.append(delivered)
            last_at.append(last)
            if last_series is None or delivered > last_series[0]:
                last_series = (delivered, {**timings_of[result_id],
                                           "delivered": delivered.isoformat() + "Z"})

        from triage_model.checkpoint import load_detector

        from triage_agent.inference import score_series

        det = load_detector(None, device="auto")
        bare = []
        if not args.no_bare:
            score_series(series_files[0], det)  # warm-up
        for files in [] if args.no_bare else series_files:
            t0 = time.perf_counter()
            score_series(files, det)
            bare.append(time.perf_counter() - t0)

    print(f"delivered series: {len(after_complete)}/{args.series} "
          f"(quiet period {args.quiet:g} s, {args.matrix}x{args.matrix})")
    print(f"{'':32} {'p50 s':>7} {'p95 s':>7}")
    print(f"{'delivered - series complete':32} {pct(after_complete, .5):7.2f} "
          f"{pct(after_complete, .95):7.2f}")
    print(f"{'delivered - last instance':32} {pct(after_last, .5):7.2f} {pct(after_last, .95):7.2f}")
    if bare:
        print(f"{'bare model time (same series)':32} {pct(bare, .5):7.2f} "
              f"{pct(bare, .95):7.2f}")
    if after_last:
        print("each series delivered after its own last slice: "
              + ", ".join(f"{v:.1f}" for v in sorted(after_last)) + " s")
        print(f"last delivered {max(after_last):.2f} s after its own last slice"
              + (f", {(max(delivered_at) - max(last_at)).total_seconds():.2f} s after the "
                 "burst's last slice" if args.burst else ""))
    print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at the end; "
          f"node workers: {args.workers if args.workers is not None else 'default'}, runtime: "
          f"{args.runtime or 'default'}")
    if last_series is not None:
        t = last_series[1]
        steps = [("last slice -> complete (quiet period, sweep)",
                  _secs(t.get("last_instance_received"), t.get("series_complete"))),
                 ("complete -> claimed (queue)",
                  _secs(t.get("series_complete"), t.get("job_claimed"))),
                 ("waiting to read (memory budget)", t.get("prepare_wait_s")),
                 ("read", t.get("read_s")), ("preprocess", t.get("preprocess_s")),
                 ("waiting for the detector (other series)", t.get("model_wait_s")),
                 ("model", t.get("model_s")),
                 ("claimed -> inference done",
                  _secs(t.get("job_claimed"), t.get("inference_done"))),
                 ("outputs (SR, heat maps)", t.get("outputs_s")),
                 ("outputs built -> delivered (commit, C-STORE)",
                  _secs(t.get("outputs_built"), t.get("delivered")))]
        print("last-delivered series, where its seconds went:")
        for name, v in steps:
            if v is not None:
                print(f"  {name:46} {float(v):6.2f} s")
    if sampler is not None:
        print(f"peak RSS of serve: {sampler.hwm_kib / 1024:.0f} MiB (its high-water mark); "
              f"sampled peak of serve and its children: {sampler.peak_kib / 1024:.0f} MiB in "
              f"{sampler.peak_processes} process(es)")
    print(f"load average {load_at_start:.1f} when the node started; the node used "
          f"{node_cpu_s:.1f} CPU seconds from the first slice to the last delivery "
          f"({node_cpu_s / (os.cpu_count() or 1):.1f} s of all {os.cpu_count()} CPUs)")
    print("node stage medians: " + ", ".join(
        f"{k[:-2]} {statistics.median(v):.2f} s" for k, v in stages.items()))
    if bare:
        print(f"overhead ratio p50 (delivered - complete) / bare model = "
              f"{statistics.median(after_complete) / statistics.median(bare):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
