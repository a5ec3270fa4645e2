"""Drift alarm: does the flag rate of the last scored series still match the calibration?

A threshold calibrated at ``[triage] target_specificity`` flags about ``1 - target_specificity``
of normal series. When a site's scanner, protocol or patients change, the scores move and the
flag rate with them, long before anyone counts false alarms. The node therefore watches the
last ``[drift] window`` assessable series (verdict normal or abnormal) scored at the operating
point now in force (same model file and threshold as the newest result) and tests the number
of flags against the expected rate with an exact two-sided binomial test. The alarm is on while
the p-value is below ``[drift] alpha`` and at least ``[drift] min_series`` series are in the
window; it sets ``/metrics`` gauges, a banner on the status page, and writes one audit event
when it starts and one when it clears.

The expected rate is ``[drift] expected_flag_rate`` when set, else ``1 - target_specificity``
of the model file's calibration (the threshold in force is the model's), else
``1 - [triage] target_specificity``. A site that also scans abnormal heads expects more flags:
with a share ``prevalence`` of abnormal series and a detector that flags a share
``sensitivity`` of them, ``expected_flag_rate = (1 - prevalence) * (1 - target_specificity) +
prevalence * sensitivity`` (e.g. 10 % abnormal, 95 % specificity, 80 % sensitivity: 0.125).

The median series score of the window is reported beside the median of the model's calibration
normals when the file stores them (series maximum aggregation only).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import binomtest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import metrics
from triage_agent.config import AgentConfig, DriftConfig
from triage_agent.models import Event, Result

log = logging.getLogger(__name__)

ALARM_EVENT = "drift_alarm"
CLEARED_EVENT = "drift_cleared"
ASSESSABLE = ("normal", "abnormal")
ADVICE = ("scores no longer match the calibration: check the scanner/protocol, run "
          "`triage-agent onboard`")


def p_value(flags: int, n: int, expected_rate: float) -> float:
    """Exact two-sided binomial p-value of ``flags`` flags in ``n`` series."""
    return float(binomtest(flags, n, expected_rate, alternative="two-sided").pvalue)


def expected_band(n: int, expected_rate: float, alpha: float) -> tuple[int, int]:
    """The flag counts ``(lo, hi)`` in ``n`` series that the test accepts at ``alpha``.

    Scans outward from the expected count: the exact two-sided p-value falls monotonically
    away from the mode of the binomial distribution."""
    mode = min(n, max(0, math.floor((n + 1) * expected_rate)))
    lo = mode
    while lo > 0 and p_value(lo - 1, n, expected_rate) >= alpha:
        lo -= 1
    hi = mode
    while hi < n and p_value(hi + 1, n, expected_rate) >= alpha:
        hi += 1
    return lo, hi


@dataclass(frozen=True)
class DriftStatus:
    """The drift test of one window of series."""

    window: int  # assessable series in the window
    flags: int  # of them flagged abnormal
    expected_rate: float
    expected_source: str  # where expected_rate comes from, in words
    alpha: float
    min_series: int
    p_value: float | None = None  # None: fewer than min_series series, no test
    band: tuple[int, int] | None = None  # accepted flag counts at this window size
    median_score: float | None = None
    calibration_median: float | None = None

    @property
    def observed_rate(self) -> float | None:
        return self.flags / self.window if self.window else None

    @property
    def tested(self) -> bool:
        return self.p_value is not None

    @property
    def alarm(self) -> bool:
        return self.p_value is not None and self.p_value < self.alpha

    @property
    def direction(self) -> str:
        """"high" or "low": on which side of the band the flag count lies ("" inside)."""
        if self.band is None:
            return ""
        return "high" if self.flags > self.band[1] else "low" if self.flags < self.band[0] else ""

    def summary(self) -> str:
        """One line for logs, the audit trail and the status page (no patient identifiers)."""
        if not self.window:
            return "no assessable series scored at the operating point in force yet"
        rate = self.observed_rate or 0.0
        text = (f"{self.flags} of the last {self.window} assessable series flagged abnormal "
                f"({rate:.0%}); the threshold is calibrated for {self.expected_rate:.1%} "
                f"({self.expected_source})")
        if self.tested and self.band is not None:
            text += (f"; binomial test p = {self.p_value:.2g}, accepted "
                     f"{self.band[0]}-{self.band[1]} flags in {self.window}")
        else:
            text += f"; no test below {self.min_series} series"
        if self.median_score is not None:
            text += f"; median series score {self.median_score:.2f}"
            if self.calibration_median is not None:
                text += f" (calibration normals {self.calibration_median:.2f})"
        return text

    def advice(self) -> str:
        """What is wrong and what to do, for the status-page banner."""
        if self.direction == "low":
            return ("far fewer flags than calibrated: the detector may be missing findings; "
                    + ADVICE)
        return ADVICE


def evaluate(verdicts: Sequence[str], scores: Sequence[float | None], *, expected_rate: float,
             alpha: float, min_series: int, expected_source: str = "",
             calibration_median: float | None = None) -> DriftStatus:
    """The drift test of one window: ``verdicts`` and ``scores`` of its series (any order);
    verdicts other than normal/abnormal are left out."""
    kept = [(v, s) for v, s in zip(verdicts, scores, strict=True) if v in ASSESSABLE]
    n = len(kept)
    flags = sum(v == "abnormal" for v, _ in kept)
    values = [float(s) for _, s in kept if s is not None]
    median = statistics.median(values) if values else None
    p = band = None
    if n and n >= min_series:
        p = p_value(flags, n, expected_rate)
        band = expected_band(n, expected_rate, alpha)
    return DriftStatus(window=n, flags=flags, expected_rate=expected_rate,
                       expected_source=expected_source, alpha=alpha, min_series=min_series,
                       p_value=p, band=band, median_score=median,
                       calibration_median=calibration_median)


def expected_rate_for(cfg: AgentConfig, model_ckpt: dict[str, Any] | None,
                      threshold_from_model: bool) -> tuple[float, str]:
    """The expected flag rate and where it comes from (see the module docstring)."""
    if cfg.drift.expected_flag_rate is not None:
        return float(cfg.drift.expected_flag_rate), "[drift] expected_flag_rate"
    calib = (model_ckpt or {}).get("calibration") or {}
    if threshold_from_model and "target_specificity" in calib:
        spec = float(calib["target_specificity"])
        return 1.0 - spec, f"model calibrated at {spec:.1%} specificity"
    spec = cfg.triage.target_specificity
    return 1.0 - spec, f"[triage] target_specificity {spec:.1%}"


def calibration_median(model_ckpt: dict[str, Any] | None, aggregate: str) -> float | None:
    """Median series score of the model's calibration normals, when the file stores them."""
    calib = (model_ckpt or {}).get("calibration") or {}
    values = calib.get("val_series_scores_max")
    if aggregate != "max" or not values:
        return None
    return float(statistics.median(float(v) for v in values))


def window_rows(s: Session, size: int) -> list[tuple[str, float | None]]:
    """(verdict, score) of the latest result of the last ``size`` assessable series scored with
    the model file and threshold of the newest assessable result (a new model or threshold
    starts a new window)."""
    newest = s.execute(
        select(Result.weights_sha256, Result.threshold)
        .where(Result.verdict.in_(ASSESSABLE)).order_by(Result.id.desc()).limit(1)
    ).first()
    if newest is None:
        return []
    sha, threshold = newest
    rows = s.execute(
        select(Result.series_id, Result.verdict, Result.score)
        .where(Result.verdict.in_(ASSESSABLE), Result.weights_sha256 == sha,
               Result.threshold == threshold)
        .order_by(Result.id.desc()).limit(4 * size)
    ).all()
    seen: set[int] = set()
    out: list[tuple[str, float | None]] = []
    for series_id, verdict, score in rows:  # a re-scored series counts once, its latest result
        if series_id in seen:
            continue
        seen.add(series_id)
        out.append((verdict, score))
        if len(out) == size:
            break
    return out


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def publish_gauges(st: DriftStatus) -> None:
    metrics.DRIFT_OBSERVED_RATE.set(_nan(st.observed_rate))
    metrics.DRIFT_EXPECTED_RATE.set(st.expected_rate)
    metrics.DRIFT_P_VALUE.set(_nan(st.p_value))
    metrics.DRIFT_WINDOW.set(st.window)
    metrics.DRIFT_ALARM.set(1 if st.alarm else 0)
    metrics.DRIFT_MEDIAN_SCORE.set(_nan(st.median_score))
    metrics.DRIFT_CALIBRATION_MEDIAN.set(_nan(st.calibration_median))


class DriftMonitor:
    """Runs the drift test on the database's result rows; keeps the last status for the page.

    Whether an alarm is already on is read from the audit trail (the newest drift event), so a
    restart or a second node on the same database does not repeat the start event."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.status: DriftStatus | None = None

    def check(self, cfg: AgentConfig, model_ckpt: dict[str, Any] | None = None,
              threshold_from_model: bool = True) -> DriftStatus:
        dcfg: DriftConfig = cfg.drift
        rate, source = expected_rate_for(cfg, model_ckpt, threshold_from_model)
        with self.sessions() as s, s.begin():
            rows = window_rows(s, dcfg.window)
            st = evaluate([v for v, _ in rows], [sc for _, sc in rows], expected_rate=rate,
                          alpha=dcfg.alpha, min_series=dcfg.min_series, expected_source=source,
                          calibration_median=calibration_median(model_ckpt,
                                                                cfg.triage.aggregate))
            last = s.scalar(select(Event.kind).where(Event.kind.in_((ALARM_EVENT, CLEARED_EVENT)))
                            .order_by(Event.id.desc()).limit(1))
            was_on = last == ALARM_EVENT
            if st.alarm and not was_on:
                s.add(Event(kind=ALARM_EVENT, detail=st.summary(), flagged=True))
                log.warning("drift alarm: %s; %s", st.summary(), st.advice())
            elif was_on and not st.alarm:
                s.add(Event(kind=CLEARED_EVENT, detail=st.summary()))
                log.info("drift alarm cleared: %s", st.summary())
        self.status = st
        publish_gauges(st)
        return st
