"""Composition root: builds the engine, storage, receiver, scheduler, workers and model once."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import completion, db, metrics
from triage_agent.audit import SPOOL_NAME, AuditLog
from triage_agent.config import AgentConfig
from triage_agent.drift import DriftMonitor
from triage_agent.models import Event, Job, JobState
from triage_agent.operating_point import OperatingPoint
from triage_agent.receiver import Receiver
from triage_agent.sender import DeliveryLanes, Sender
from triage_agent.storage import Storage
from triage_agent.web import WebServer, open_node_warning
from triage_agent.worker import Worker, make_worker_id

log = logging.getLogger(__name__)


@dataclass
class Model:
    """The loaded detector plus the scorer bound to the [triage] settings."""

    name: str
    version: str
    weights_sha256: str
    detector: Any

    def operating_point(self, cfg: AgentConfig) -> OperatingPoint:
        """Threshold and priority bands in force: the model's threshold unless [triage] sets one."""
        return OperatingPoint.resolve(cfg.triage, self.detector.threshold_for(cfg.triage.aggregate))

    def scorer(self, cfg: AgentConfig) -> Any:
        from triage_agent.inference import score_series

        t = cfg.triage
        op = self.operating_point(cfg)
        if op.mismatch:
            log.warning("%s", op.mismatch)
        log.info("operating threshold %.4g (from the %s)", op.threshold,
                 "model file" if op.source == "model" else "configuration")

        def score(paths: Any) -> Any:
            return score_series(
                paths, self.detector, lambda_=t.lambda_, threshold=op.threshold,
                aggregate=t.aggregate, top_k=t.top_k, batch_size=cfg.model.batch_size,
            )

        return score


class StartupError(Exception):
    """The node cannot start; the message says which setting or file to fix."""


def load_model(cfg: AgentConfig) -> Model:
    from triage_model.checkpoint import load_detector

    try:
        det = load_detector(cfg.model.weights, device=cfg.model.device,
                            runtime=cfg.model.runtime)
    except Exception as e:
        raise StartupError(f"cannot load the model ([model] weights): {e}") from e
    log.info("model %s %s loaded (weights %s)", det.name, det.version, det.weights_sha256[:12])
    metrics.MODEL_INFO.labels(det.name, det.version, det.weights_sha256).set(1)
    return Model(det.name, det.version, det.weights_sha256, det)


def release_dead_local_jobs(sessions: sessionmaker[Session]) -> int:
    """Re-queue jobs this host's previous (crashed) process held, without waiting for the lease.

    Only jobs whose worker id names this host and a process that no longer exists: another
    machine's workers share the queue on PostgreSQL and keep their leases.
    """
    host = socket.gethostname()
    n = 0
    with sessions() as s, s.begin():
        for job in s.scalars(select(Job).where(Job.state == JobState.RUNNING)).all():
            wid = job.worker_id or ""
            parts = wid.split(":")
            if len(parts) != 3 or parts[0] != host:
                continue
            try:
                pid = int(parts[1])
                alive = pid != os.getpid() and _pid_alive(pid)
            except ValueError:
                alive = False
            if not alive:
                s.execute(update(Job).where(Job.id == job.id).values(lease_until=None,
                                                                     state=JobState.QUEUED))
                n += 1
        if n:
            s.add(Event(kind="jobs_recovered", detail=f"{n} job(s) of a crashed process re-queued"))
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class App:
    cfg: AgentConfig
    run_receiver: bool = True
    worker_count: int | None = None
    engine: Engine = field(init=False)
    sessions: sessionmaker[Session] = field(init=False)
    storage: Storage = field(init=False)
    audit: AuditLog = field(init=False)
    receiver: Receiver | None = None
    scheduler: BackgroundScheduler | None = None
    workers: list[Worker] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    model: Model | None = None
    sender: Sender | None = None
    lanes: DeliveryLanes | None = None
    web: Any = None
    drift: DriftMonitor | None = None

    def __post_init__(self) -> None:
        db.upgrade(self.cfg.database.url)
        self.engine = db.make_engine(self.cfg.database.url)
        db.check_connection(self.engine)
        self.sessions = db.session_factory(self.engine)
        self.storage = Storage(self.cfg.storage.root, self.cfg.storage.high_water_percent)
        self.audit = AuditLog(self.sessions, self.storage.root / SPOOL_NAME)
        with contextlib.suppress(ValueError):  # already registered (several Apps in one process)
            REGISTRY.register(metrics.DatabaseCollector(self.sessions))

    def start(self) -> None:
        if self.run_receiver and self.cfg.security.open_to_anyone:
            log.warning("%s Restrict callers in agent.toml ([security]).",
                        open_node_warning(self.cfg))
        self.audit.start()  # replays what an earlier run left in the audit spool
        removed = self.storage.clean_tmp()
        if removed:
            log.info("removed %d temp file(s) left by an earlier crash", removed)
        recovered = release_dead_local_jobs(self.sessions)
        if recovered:
            log.info("re-queued %d job(s) of a crashed process", recovered)
        count = self.cfg.worker.count if self.worker_count is None else self.worker_count
        if count:
            self.model = load_model(self.cfg)
            scorer = self.model.scorer(self.cfg)
            for i in range(count):
                w = Worker(self.cfg, self.sessions, self.storage, scorer, self.model,
                           make_worker_id(i))
                t = threading.Thread(target=w.run_forever, name=f"worker-{i}", daemon=True)
                self.workers.append(w)
                self.threads.append(t)
                t.start()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(
            self._sweep, "interval", seconds=self.cfg.series.sweep_interval_s,
            id="completion-sweep", max_instances=1, coalesce=True,
        )
        self.sender = Sender(self.cfg, self.sessions, self.storage)
        self.lanes = DeliveryLanes(self.sender, self._audit_delivery)
        self._deliver()  # a lane per destination, sending at once
        self.scheduler.add_job(
            self._deliver, "interval", seconds=self.cfg.delivery.interval_s,
            id="delivery", max_instances=1, coalesce=True,
        )
        if self.cfg.drift.enabled:
            self.drift = DriftMonitor(self.sessions)
            self.scheduler.add_job(
                self._check_drift, "interval", seconds=self.cfg.drift.interval_s, id="drift",
                max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.UTC),
            )
        self.scheduler.start()
        if self.run_receiver:
            self.receiver = Receiver(self.cfg, self.storage, self.sessions, self.audit)
            self.receiver.start()
        if self.cfg.http.enabled:
            self.web = WebServer(self)
            self.web.start()

    def _deliver(self) -> None:
        """Keep a delivery lane per configured destination (each sends on its own threads) and
        dead-letter deliveries to destinations no longer configured."""
        assert self.lanes is not None
        try:
            self.lanes.sync()
        except Exception:
            log.exception("delivery lanes could not be updated; will retry on the next tick")

    def _audit_delivery(self, kind: str, detail: str) -> None:
        from triage_agent.ingest import audit

        audit(self.sessions, kind, detail=detail)

    def _check_drift(self) -> None:
        """The drift test on the latest results (triage_agent/drift.py)."""
        assert self.drift is not None
        try:
            if self.model is not None:
                from_model = self.model.operating_point(self.cfg).source == "model"
                self.drift.check(self.cfg, self.model.detector.ckpt, from_model)
            else:  # receive-only node: no model file to read the calibration from
                self.drift.check(self.cfg, None, self.cfg.triage.threshold is None)
        except Exception:
            log.exception("drift check failed; will retry on the next tick")

    def _sweep(self) -> None:
        try:
            completion.sweep(self.sessions, self.cfg.series)
        except Exception:
            log.exception("completion sweep failed; will retry on the next tick")

    # Sections a SIGHUP applies; the others (ports, database, storage) need a restart. The model
    # file is loaded again when [model] or the file itself changed.
    RELOADABLE = ("triage", "destinations", "hl7_destinations", "dicomweb_destinations", "delivery",
                  "outputs", "security", "series", "logging", "drift", "model")

    def reload(self, new: AgentConfig) -> list[str]:
        """Apply reloadable settings from ``new`` without dropping associations.

        Returns the sections that changed; sections that would need a restart are logged and
        left as they are.
        """
        old = self.cfg
        changed = [k for k in AgentConfig.model_fields if getattr(old, k) != getattr(new, k)]
        ignored = [k for k in changed if k not in self.RELOADABLE]
        applied = [k for k in changed if k in self.RELOADABLE]
        if ignored:
            log.warning("reload: %s changed but need(s) a restart; kept as they were",
                        ", ".join(ignored))
        cfg = old.model_copy(update={k: getattr(new, k) for k in applied})
        self.cfg = cfg
        note = self._reload_model(old) if self.model is not None else None
        if note is not None:
            applied = [k for k in applied if k != "model"] + [note]
            cfg = self.cfg
        if self.receiver is not None:
            self.receiver.cfg = cfg  # read per association: new allow-lists apply to the next one
            if old.security.tls != cfg.security.tls:
                self.receiver.reload_tls(old, cfg)
        if self.sender is not None:
            self.sender.cfg = cfg
            self._deliver()  # lanes follow added, removed and changed destinations now
        scorer = self.model.scorer(cfg) if self.model is not None else None
        for w in self.workers:
            w.cfg = cfg
            if scorer is not None:
                w.model = self.model  # type: ignore[assignment]
                w.scorer = scorer
        if applied:
            log.info("reload: applied %s", ", ".join(applied))
            with self.sessions() as s, s.begin():
                s.add(Event(kind="config_reloaded",
                            detail="applied: " + ", ".join(applied)
                            + ("; needs restart: " + ", ".join(ignored) if ignored else "")))
        return applied

    def _reload_model(self, old: AgentConfig) -> str | None:
        """Load the model again when [model] or the model file changed (a site model written
        over the old one). Returns what to record, None when nothing changed. A file that does
        not load leaves the model in use, and its [model] settings, as they were."""
        from triage_model.checkpoint import default_weights_path, sha256_file

        assert self.model is not None
        path = self.cfg.model.weights or default_weights_path()
        try:
            same = self.cfg.model == old.model and sha256_file(path) == self.model.weights_sha256
        except OSError:
            same = False
        if same:
            return None
        try:
            model = load_model(self.cfg)
        except StartupError as e:
            log.error("reload: %s; the model in use is kept", e)
            self.cfg = self.cfg.model_copy(update={"model": old.model})
            return "model kept (the new one does not load)"
        before = (self.model.name, self.model.version, self.model.weights_sha256)
        if before != (model.name, model.version, model.weights_sha256):
            with contextlib.suppress(KeyError):
                metrics.MODEL_INFO.remove(*before)
        self.model = model
        log.info("reload: model %s %s (weights %s) in use", model.name, model.version,
                 model.weights_sha256[:12])
        return f"model {model.name} {model.version} weights {model.weights_sha256[:12]}"

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking associations, let in-flight ones finish, stop scheduler and workers."""
        if self.web is not None:
            self.web.stop()
        if self.receiver is not None:
            self.receiver.stop()
            deadline = time.monotonic() + grace_s
            while self.receiver.ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.1)
            for assoc in self.receiver.ae.active_associations:
                assoc.abort()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.lanes is not None:
            self.lanes.stop(min(grace_s, 5.0))
        for w in self.workers:
            w.stop()
        for t in self.threads:
            t.join(timeout=grace_s)
        self.audit.stop()  # written, or kept in the spool for the next start
        self.engine.dispose()
        log.info("stopped")
