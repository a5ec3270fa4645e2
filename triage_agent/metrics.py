"""Prometheus metrics. Labels carry outcomes and reasons, never UIDs or patient identifiers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from triage_agent.models import Delivery, Job, JobState, Series

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

ASSOCIATIONS = Counter(
    "triage_associations_total", "Associations by outcome and rejection reason",
    ["outcome", "reason"],
)
ADMISSION_REFUSED = Counter(
    "triage_admission_refused_total",
    "Connections and associations the receiver turned away, by calling host (IP address, "
    "\"other\" past 256 hosts) and reason (listener_saturated, per_address_limit, unlisted_limit, "
    "association_limit)",
    ["address", "reason"],
)
REFUSED_PROPOSALS = Counter(
    "triage_refused_proposals_total",
    "SOP classes a peer proposed that an association could not carry, by reason (sop_class: not "
    "accepted by this node; transfer_syntax: none of the proposed syntaxes accepted)",
    ["reason", "sop_class", "transfer_syntax"],
)
INSTANCES = Counter(
    "triage_instances_received_total",
    "C-STORE requests by outcome (stored, duplicate, quarantined, or a failure status)",
    ["outcome"],
)
STAGE_SECONDS = Histogram(
    "triage_stage_seconds",
    "Seconds spent in each pipeline stage (complete->claimed, read, preprocess, model_wait "
    "(for the detector, busy with other series), model, outputs)",
    ["stage"], buckets=STAGE_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "triage_inference_seconds", "Seconds to read, preprocess and score one series",
    buckets=STAGE_BUCKETS,
)
LAST_INSTANCE_TO_DELIVERED = Histogram(
    "triage_last_instance_to_delivered_seconds",
    "Seconds from the last instance of a series received to all its results delivered",
    buckets=STAGE_BUCKETS,
)
DELIVERIES = Counter(
    "triage_deliveries_total", "Delivery attempts by outcome (delivered, retry, dead)",
    ["outcome"],
)
MODEL_INFO = Gauge(
    "triage_model_info", "The loaded detector (value 1)", ["name", "version", "weights_sha256"],
)
# Delivery lanes (triage_agent/sender.py): one circuit breaker per destination.
DESTINATION_CIRCUIT = Gauge(
    "triage_destination_circuit_state",
    "Delivery circuit breaker per destination: 0 closed (sending), 1 half-open (one delivery "
    "tried), 2 open (not trying until the cool-down ends)", ["destination"],
)
DESTINATION_FAILURES = Gauge(
    "triage_destination_consecutive_failures",
    "Delivery attempts in a row a destination did not answer (refused, timed out, aborted)",
    ["destination"],
)
# The audit writer (triage_agent/audit.py): events wait in memory, then in the spool file.
AUDIT_QUEUE_DEPTH = Gauge(
    "triage_audit_queue_depth", "Audit events waiting in memory for the database writer",
)
AUDIT_SPOOLED = Gauge(
    "triage_audit_spooled_events",
    "Audit events kept in the storage root's audit-spool.jsonl until the database takes them",
)
AUDIT_EVENTS = Counter(
    "triage_audit_events_total",
    "Audit events by path (written, spooled, replayed from the spool, dropped as refused by "
    "the database, lost when the spool could not be written)",
    ["outcome"],
)


# The drift alarm (triage_agent/drift.py); NaN where there is nothing to report yet.
DRIFT_OBSERVED_RATE = Gauge(
    "triage_drift_observed_flag_rate",
    "Share of the last [drift] window assessable series flagged abnormal",
)
DRIFT_EXPECTED_RATE = Gauge(
    "triage_drift_expected_flag_rate", "Flag rate the operating threshold was calibrated for",
)
DRIFT_P_VALUE = Gauge(
    "triage_drift_p_value",
    "Exact two-sided binomial p-value of the window's flag count (NaN below [drift] min_series)",
)
DRIFT_WINDOW = Gauge("triage_drift_window_series", "Assessable series in the drift window")
DRIFT_ALARM = Gauge(
    "triage_drift_alarm", "1 while the window's flag rate is outside the calibrated band",
)
DRIFT_MEDIAN_SCORE = Gauge(
    "triage_drift_window_median_score", "Median series score of the drift window",
)
DRIFT_CALIBRATION_MEDIAN = Gauge(
    "triage_drift_calibration_median_score",
    "Median series score of the model's calibration normals (NaN when the file has none)",
)


class DatabaseCollector(Collector):
    """Series by state, queue depth and pending deliveries, read from the database at scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        series = GaugeMetricFamily("triage_series", "Series by state", labels=["state"])
        queue = GaugeMetricFamily("triage_queue_depth", "Jobs queued or running",
                                  labels=["state"])
        deliveries = GaugeMetricFamily("triage_delivery_rows", "Deliveries (object x destination) by state",
                                       labels=["state"])
        try:
            with self.sessions() as s:
                for series_state, n in s.execute(select(Series.state, func.count())
                                                 .group_by(Series.state)):
                    series.add_metric([str(series_state)], n)
                for job_state, n in s.execute(
                        select(Job.state, func.count())
                        .where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                        .group_by(Job.state)):
                    queue.add_metric([str(job_state)], n)
                for delivery_state, n in s.execute(select(Delivery.state, func.count())
                                                   .group_by(Delivery.state)):
                    deliveries.add_metric([str(delivery_state)], n)
        except Exception:  # a scrape must not fail because the database blinked
            return
        yield series
        yield queue
        yield deliveries
