"""Scale-out on PostgreSQL: two `triage-agent worker` processes share one queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select
from triage_model.synth import make_case

from tests.conftest import Node, storescu
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent.models import Job, Result, Series
from triage_agent.synth_dicom import write_case_dicom


def clone_series(src: list[Path], out: Path, k: int) -> list[Path]:
    """A copy of a series with fresh study/series/instance UIDs (cheap extra series)."""
    out.mkdir(parents=True)
    paths = []
    for i, f in enumerate(src):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = f"{ds.StudyInstanceUID[:50]}.{k}"
        ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID[:50]}.{k}"
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID[:50]}.{k}.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"{i:04d}.dcm"
        ds.save_as(p)
        paths.append(p)
    return paths


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_workers_each_job_once_and_a_killed_workers_job_is_taken_over(
    node_factory: Any, tiny_ckpt: Path, tmp_path: Path  # noqa: F811
) -> None:
    node: Node = node_factory(
        worker={"count": 0, "lease_s": 4.0, "poll_interval_s": 0.2},
        model={"weights": str(tiny_ckpt)},
        # Long enough that a loaded machine's pause inside one storescu run is not taken for
        # the end of the series (which would cancel and re-queue it: a second job row).
        series={"quiet_period_s": 4.0, "sweep_interval_s": 0.2},
    ).start()
    base = write_case_dicom(make_case(51, "normal", matrix=128), tmp_path / "base")
    series = [clone_series(base, tmp_path / f"s{k}", k) for k in range(20)]
    for files in series:
        assert storescu(node.port, files).returncode == 0
    sessions = node.session()

    def count(*where: Any) -> int:
        with sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(*where)) or 0)

    deadline = time.monotonic() + 60
    while count(Job.state == "queued") < 20 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert count(Job.state == "queued") == 20

    def start_worker(i: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "triage_agent.cli", "worker", "--config", str(node.config)],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"worker{i}.log", "w"),  # noqa: SIM115
            text=True,
        )

    w1, w2 = start_worker(1), start_worker(2)
    try:
        # Kill worker 1 with -9 while it holds a job.
        victim_job = None
        deadline = time.monotonic() + 120
        while victim_job is None and time.monotonic() < deadline:
            with sessions() as s:
                victim_job = s.scalar(select(Job.id).where(
                    Job.state == "running", Job.worker_id.like(f"%:{w1.pid}:%")))
            time.sleep(0.05)
        assert victim_job is not None, "worker 1 never claimed a job"
        os.kill(w1.pid, signal.SIGKILL)
        w1.wait()

        deadline = time.monotonic() + 240
        while count(Job.state == "done") < 20 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert count(Job.state == "done") == 20, (tmp_path / "worker2.log").read_text()[-2000:]
    finally:
        for w in (w1, w2):
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
                w.wait(60)

    with sessions() as s:
        results = s.execute(select(Result.job_id, Result.series_id)).all()
        assert len(results) == 20
        assert len({j for j, _ in results}) == 20 and len({sid for _, sid in results}) == 20
        assert s.scalar(select(func.count()).select_from(Job)) == 20, [  # none queued twice
            (j.series_id, j.generation, j.state) for j in s.scalars(select(Job))]
        taken_over = s.get(Job, victim_job)
        assert taken_over.attempts == 2 and f":{w2.pid}:" in taken_over.worker_id
        assert set(s.scalars(select(Series.state))) == {"scored"}
        others = s.scalars(select(Job.attempts).where(Job.id != victim_job)).all()
        assert set(others) == {1}
