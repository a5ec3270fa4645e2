"""Queue worker: claims a job, reads the series, runs the detector, commits the result.

The detector is loaded once per process (app.py) and passed in; the worker only knows the
``Scorer`` callable, so tests and the scale-out command can swap models without globals.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import metrics, publish, queue
from triage_agent.config import AgentConfig
from triage_agent.dicomweb import stow_destination_key
from triage_agent.ingest import short_id
from triage_agent.models import (
    Delivery,
    Event,
    Instance,
    Job,
    Output,
    Result,
    Series,
    SeriesState,
    SliceScore,
    utcnow,
)
from triage_agent.sender import HL7_PREFIX, destination_key
from triage_agent.storage import Storage

log = logging.getLogger(__name__)


class SeriesScore(Protocol):
    """What a scorer returns (triage_agent.inference.SeriesResult satisfies it)."""

    score: float | None
    verdict: str
    threshold: float
    reason: str | None
    slices: list[tuple[str | None, float]]
    timings: dict[str, float]


class ModelInfo(Protocol):
    name: str
    version: str
    weights_sha256: str


Scorer = Callable[[Sequence[Path]], SeriesScore]


class PermanentJobError(Exception):
    """Retrying cannot help (e.g. the series' files are gone); dead-letter at once."""


def make_worker_id(index: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class Worker:
    def __init__(
        self,
        cfg: AgentConfig,
        sessions: sessionmaker[Session],
        storage: Storage,
        scorer: Scorer,
        model: ModelInfo,
        worker_id: str,
    ) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.storage = storage
        self.scorer = scorer
        self.model = model
        self.worker_id = worker_id
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        queue.JOBS_QUEUED.notify()  # wake it if idle

    def run_forever(self) -> None:
        log.info("worker %s started", self.worker_id)
        self.warm_up()
        while not self._stop.is_set():
            since = queue.JOBS_QUEUED.mark()
            try:
                did = self.run_once()
            except Exception:
                log.exception("worker %s: unexpected error; backing off", self.worker_id)
                did = False
            if not did and not self._stop.is_set():
                # until this process queues a job (completion sweep) or the next poll
                queue.JOBS_QUEUED.wait(since, self.cfg.worker.poll_interval_s)
        log.info("worker %s stopped", self.worker_id)

    def warm_up(self) -> None:
        """Before the first series: build the model's runtime (the workers share it) and load
        what building the outputs needs once per process (seconds each on a small CPU)."""
        detector = getattr(self.model, "detector", None)
        if detector is None:
            return
        from triage_agent.inference import model_gate, warm_up

        model_gate(detector, self.cfg.worker.model_slots)
        t0 = time.perf_counter()
        try:
            warm_up(detector, self.cfg.model.batch_size)
            _warm_outputs()
        except Exception as e:  # the first series builds it (and reports what fails)
            log.warning("worker %s: warm-up failed (%s); the first series does it",
                        self.worker_id, e.__class__.__name__)
            return
        log.info("worker %s: model and output builders ready (%.1f s)", self.worker_id,
                 time.perf_counter() - t0)

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue had nothing runnable."""
        claim = self._claim()
        if claim is None:
            return False
        log.info("job %d: scoring series %s (%d files)", claim.job_id,
                 short_id(claim.series_uid), len(claim.paths))
        try:
            done = self._score_and_build(claim)
        except PermanentJobError as e:
            self._fail(claim.job_id, str(e), permanent=True)
            return True
        except Exception as e:
            log.warning("job %d failed: %s", claim.job_id, e.__class__.__name__)
            self._fail(claim.job_id, _error_text(e), permanent=False)
            return True
        if not self._commit(claim, done):
            return True
        _observe(claim, done)
        log.info("job %d: %s (score %s)", claim.job_id, done.result.verdict,
                 "-" if done.result.score is None else f"{done.result.score:.3f}")
        return True

    def _claim(self) -> _Claim | None:
        """Claim the next runnable job and read what scoring needs of its series."""
        wcfg = self.cfg.worker
        with self.sessions() as s, s.begin():
            job = queue.claim(s, self.worker_id, wcfg.lease_s, wcfg.max_attempts)
            if job is None:
                return None
            claimed_at = utcnow()
            paths, series_uid, last_received, completed = self._series_files(s, job.series_id)
            return _Claim(job.id, job.series_id, job.generation, claimed_at, paths, series_uid,
                          last_received, completed)

    def _score_and_build(self, claim: _Claim) -> _Done:
        """Score the series (lease renewed meanwhile) and build its outputs; raises
        PermanentJobError when the stored files are gone."""
        paths = claim.paths
        if not paths:
            raise PermanentJobError("series has no stored image files")
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise PermanentJobError(f"{len(missing)} stored file(s) missing from storage")
        with _LeaseKeeper(self, claim.job_id):
            t0 = time.perf_counter()
            result = self.scorer(paths)
            infer_s = time.perf_counter() - t0
            inference_done = utcnow()
        priority = publish.priority_for(result.score, self.cfg, result.threshold)
        t1 = time.perf_counter()
        outputs = publish.build_outputs(
            cfg=self.cfg, storage=self.storage, source_paths=paths, result=result,
            model=self.model,
            uid_key=f"{claim.series_uid}/{claim.generation}/{self.model.weights_sha256}",
            supersedes_path=self._previous_sr(claim.series_id, claim.generation),
            priority=priority, content_datetime=claim.completed,
        )
        outputs_s = time.perf_counter() - t1
        return _Done(result, priority, outputs, infer_s, inference_done, outputs_s)

    def _commit(self, claim: _Claim, done: _Done) -> bool:
        """Store the result, its outputs, their deliveries and the slice scores, and complete
        the job, in one transaction; False (nothing stored) when the lease was lost."""
        result = done.result
        timings = _timings(claim, done)
        with self.sessions() as s, s.begin():
            job = s.get(Job, claim.job_id)
            if job is None or job.worker_id != self.worker_id or job.state != "running":
                log.warning("job %d: lease lost before commit; result discarded", claim.job_id)
                return False
            row = Result(
                job_id=claim.job_id,
                series_id=claim.series_id,
                score=result.score,
                verdict=result.verdict,
                threshold=result.threshold,
                reason=result.reason,
                model_name=self.model.name,
                model_version=self.model.version,
                weights_sha256=self.model.weights_sha256,
                timings=timings,
                priority=done.priority,
            )
            s.add(row)
            s.flush()
            self._add_outputs(s, row.id, done.outputs)
            s.add_all(
                SliceScore(result_id=row.id, sop_instance_uid=uid, slice_index=i, score=float(sc))
                for i, (uid, sc) in enumerate(result.slices)
            )
            queue.complete(s, job, SeriesState.SCORED)
            s.add(Event(kind="series_scored", series_instance_uid=claim.series_uid,
                        detail=f"job {claim.job_id} generation {claim.generation}: "
                        f"{result.verdict}"
                        + (f" score {result.score:.3f}" if result.score is not None else "")))
        return True

    def _add_outputs(
        self, s: Session, result_id: int, outputs: Sequence[publish.BuiltOutput]
    ) -> None:
        """One Output row per built object and, in active mode, its deliveries (HL7 messages
        to their RIS, DICOM objects to every C-STORE and STOW-RS destination)."""
        deliver = self.cfg.triage.mode == "active"
        for o in outputs:
            orow = Output(result_id=result_id, kind=o.kind, sop_class_uid=o.sop_class_uid,
                          sop_instance_uid=o.sop_instance_uid,
                          series_instance_uid=o.series_instance_uid, path=o.relpath)
            s.add(orow)
            s.flush()
            if not deliver:
                continue
            if o.kind == "hl7":
                s.add(Delivery(output_id=orow.id, destination=HL7_PREFIX + str(o.destination)))
            else:
                s.add_all(Delivery(output_id=orow.id, destination=destination_key(d))
                          for d in self.cfg.destinations)
                s.add_all(Delivery(output_id=orow.id, destination=stow_destination_key(d))
                          for d in self.cfg.dicomweb_destinations)

    def _previous_sr(self, series_id: int, generation: int) -> Path | None:
        """The SR of the latest earlier generation of this series, which a re-run supersedes."""
        with self.sessions() as s:
            rel = s.scalar(
                select(Output.path)
                .join(Result, Result.id == Output.result_id)
                .join(Job, Job.id == Result.job_id)
                .where(Result.series_id == series_id, Output.kind == "sr",
                       Job.generation < generation)
                .order_by(Job.generation.desc())
                .limit(1)
            )
        return self.storage.abspath(rel) if rel else None

    def _series_files(self, s: Session, series_id: int) -> tuple[list[Path], str, Any, Any]:
        series = s.get(Series, series_id)
        assert series is not None
        rels = s.scalars(
            select(Instance.path).where(Instance.series_id == series_id, Instance.path.is_not(None))
        ).all()
        paths = [self.storage.abspath(r) for r in rels if r]
        return paths, series.series_instance_uid, series.last_received_at, series.completed_at

    def _fail(self, job_id: int, error: str, *, permanent: bool) -> None:
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id)
            if job is None or job.worker_id != self.worker_id:
                return
            queue.fail(s, job, error, permanent=permanent, max_attempts=self.cfg.worker.max_attempts)
            series_uid = s.scalar(select(Series.series_instance_uid).where(Series.id == job.series_id))
            s.add(Event(kind="job_failed", series_instance_uid=series_uid,
                        detail=f"job {job_id} attempt {job.attempts}: {error}"[:2000],
                        flagged=job.state == "failed"))


class _LeaseKeeper:
    """Renews the job's lease in the background while a long inference runs."""

    def __init__(self, worker: Worker, job_id: int) -> None:
        self.worker, self.job_id = worker, job_id
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        lease_s = self.worker.cfg.worker.lease_s
        while not self._done.wait(lease_s / 3):
            try:
                with self.worker.sessions() as s, s.begin():
                    queue.renew(s, self.job_id, self.worker.worker_id, lease_s)
            except Exception:
                log.warning("job %d: could not renew lease", self.job_id)


@dataclass(frozen=True)
class _Claim:
    """A claimed job and what scoring needs of its series."""

    job_id: int
    series_id: int
    generation: int
    claimed_at: Any
    paths: list[Path]
    series_uid: str
    last_received: Any
    completed: Any


@dataclass(frozen=True)
class _Done:
    """A scored series with its outputs built, not yet committed."""

    result: SeriesScore
    priority: str
    outputs: list[publish.BuiltOutput]
    infer_s: float
    inference_done: Any
    outputs_s: float


def _warm_outputs() -> None:
    """Import the SR and heat-map builders (highdicom, matplotlib) and load highdicom's tables of
    the standard, which it parses on first use."""
    from highdicom import _standard_utils

    from triage_agent.outputs import sc, sr  # noqa: F401

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        load = getattr(_standard_utils, name, None)  # cached loaders; absent in other versions
        if callable(load):
            load()


def _error_text(e: Exception) -> str:
    """Exception class and the file:line it came from. Only our own exceptions' messages are
    stored: others (pydicom, numpy) may quote header values, which are sender-controlled and can
    carry patient identifiers."""
    where = e.__traceback__
    while where is not None and where.tb_next is not None:
        where = where.tb_next
    place = (f" in {where.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:"
             f"{where.tb_lineno}") if where is not None else ""
    return f"{e.__class__.__name__}{place}"


def _timings(claim: _Claim, done: _Done) -> dict[str, Any]:
    """The Result row's timings: stage timestamps, durations and the scorer's own timings."""
    return {
        "last_instance_received": _iso(claim.last_received),
        "series_complete": _iso(claim.completed),
        "job_claimed": _iso(claim.claimed_at),
        "inference_done": _iso(done.inference_done),
        "inference_s": round(done.infer_s, 4),
        "outputs_s": round(done.outputs_s, 4),
        "outputs_built": _iso(utcnow()),
        **{k: round(float(v), 4) for k, v in (done.result.timings or {}).items()},
    }


def _observe(claim: _Claim, done: _Done) -> None:
    """Stage durations of a committed job into the Prometheus histograms."""
    metrics.INFERENCE_SECONDS.observe(done.infer_s)
    metrics.STAGE_SECONDS.labels("outputs").observe(done.outputs_s)
    if claim.completed is not None:
        metrics.STAGE_SECONDS.labels("complete_to_claimed").observe(
            max(0.0, (claim.claimed_at - claim.completed).total_seconds()))
    timings = done.result.timings or {}
    for stage in ("prepare_wait", "read", "preprocess", "model_wait", "model"):
        if f"{stage}_s" in timings:
            metrics.STAGE_SECONDS.labels(stage).observe(float(timings[f"{stage}_s"]))


def _iso(t: Any) -> str | None:
    return t.isoformat() + "Z" if t is not None else None

