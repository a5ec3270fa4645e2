"""The drift alarm: binomial band, start/clear transitions, minimum window, and the node showing
it in /metrics, on the status page and in the audit trail."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path

import pytest
from scipy.stats import binom
from sqlalchemy import select
from triage_model.synth import make_case

from tests.conftest import Node, storescu, wait_for
from tests.factories import CANARY_ID, CANARY_NAME
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent import db
from triage_agent.config import AgentConfig, ConfigError, DriftConfig, load_config
from triage_agent.drift import (
    ALARM_EVENT,
    CLEARED_EVENT,
    DriftMonitor,
    calibration_median,
    evaluate,
    expected_band,
    expected_rate_for,
    p_value,
)
from triage_agent.models import Event, Job, Result, Series, Study
from triage_agent.synth_dicom import write_case_dicom

# ----------------------------------------------------------------------------- pure logic


def test_band_matches_the_exact_binomial_test() -> None:
    # 50 series at 5 %: 0-7 flags are accepted at alpha 0.01, 8 are not
    assert expected_band(50, 0.05, 0.01) == (0, 7)
    assert p_value(7, 50, 0.05) >= 0.01 > p_value(8, 50, 0.05)
    # at 10 %, no flag at all in 50 series is also outside the band
    lo, hi = expected_band(50, 0.10, 0.01)
    assert (lo, hi) == (1, 11) and p_value(0, 50, 0.10) < 0.01
    # one-sided tail of the two-sided test: 8 or more flags is rarer than 1 % under 5 %
    assert binom.sf(7, 50, 0.05) < 0.01


def test_alarm_only_outside_the_band_and_from_the_minimum_window() -> None:
    kw = dict(expected_rate=0.05, alpha=0.01, min_series=20)
    inside = evaluate(["abnormal"] * 7 + ["normal"] * 43, [5.0] * 50, **kw)
    assert inside.tested and not inside.alarm and inside.band == (0, 7)
    high = evaluate(["abnormal"] * 8 + ["normal"] * 42, [5.0] * 50, **kw)
    assert high.alarm and high.direction == "high" and high.observed_rate == 0.16
    assert "triage-agent onboard" in high.advice() and "scanner/protocol" in high.advice()
    # 19 series, all flagged: far outside, but below min_series there is no test and no alarm
    few = evaluate(["abnormal"] * 19, [9.0] * 19, **kw)
    assert not few.tested and not few.alarm and few.p_value is None
    assert "no test below 20 series" in few.summary()
    assert evaluate(["abnormal"] * 20, [9.0] * 20, **kw).alarm
    # series that could not be assessed do not count
    na = evaluate(["not_assessable"] * 30 + ["normal"] * 19, [None] * 30 + [1.0] * 19, **kw)
    assert na.window == 19 and not na.tested


def test_too_few_flags_is_an_alarm_too_with_its_own_advice() -> None:
    st = evaluate(["normal"] * 100, [0.5] * 100, expected_rate=0.10, alpha=0.01, min_series=20)
    assert st.alarm and st.direction == "low" and "missing findings" in st.advice()


def test_summary_reports_median_against_calibration_normals() -> None:
    st = evaluate(["abnormal", "normal", "normal"], [9.0, 3.0, 1.0], expected_rate=0.05,
                  alpha=0.01, min_series=3, expected_source="model", calibration_median=1.6)
    assert st.median_score == 3.0
    assert "median series score 3.00 (calibration normals 1.60)" in st.summary()
    assert "1 of the last 3 assessable series flagged abnormal (33%)" in st.summary()


def test_expected_rate_sources() -> None:
    ckpt = {"calibration": {"target_specificity": 0.9, "val_series_scores_max": [1, 2, 3, 10]}}
    cfg = AgentConfig()
    assert expected_rate_for(cfg, ckpt, True)[0] == pytest.approx(0.1)
    # a [triage] threshold overrides the model's: the model's calibration no longer applies
    assert expected_rate_for(cfg, ckpt, False)[0] == pytest.approx(0.05)
    site = cfg.model_copy(update={"drift": DriftConfig(expected_flag_rate=0.125)})
    assert expected_rate_for(site, ckpt, True) == (0.125, "[drift] expected_flag_rate")
    assert calibration_median(ckpt, "max") == 2.5
    assert calibration_median(ckpt, "topk_mean") is None and calibration_median({}, "max") is None


def test_drift_config_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    for text, message in (("alpha = 2", "drift.alpha"),
                          ("window = 10\nmin_series = 30", "min_series must not exceed window")):
        bad.write_text(f"[drift]\n{text}\n")
        with pytest.raises(ConfigError) as e:
            load_config(bad)
        assert message in str(e.value)


# ----------------------------------------------------------------------------- on result rows


def _add_results(sessions, verdicts: list[str], *, threshold: float = 4.0, sha: str = "a" * 64,
                 start: int = 0) -> None:
    with sessions() as s, s.begin():
        study = s.scalar(select(Study).limit(1))
        if study is None:
            study = Study(study_instance_uid="1.2.3", patient_name=CANARY_NAME,
                          patient_id=CANARY_ID)
            s.add(study)
            s.flush()
        for i, v in enumerate(verdicts, start):
            series = Series(series_instance_uid=f"1.2.3.{i}", study_id=study.id, state="scored")
            s.add(series)
            s.flush()
            job = Job(series_id=series.id, state="done")
            s.add(job)
            s.flush()
            s.add(Result(job_id=job.id, series_id=series.id, verdict=v, threshold=threshold,
                         score=threshold + (1 if v == "abnormal" else -1), model_name="m",
                         model_version="1", weights_sha256=sha))


def _drift_events(sessions) -> list[tuple[str, str]]:
    with sessions() as s:
        return [(e.kind, e.detail or "") for e in s.scalars(
            select(Event).where(Event.kind.in_((ALARM_EVENT, CLEARED_EVENT))).order_by(Event.id))]


def test_monitor_writes_one_event_when_the_alarm_starts_and_one_when_it_clears(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    db.upgrade(url)
    sessions = db.session_factory(db.make_engine(url))
    cfg = AgentConfig(drift=DriftConfig(window=20, min_series=10))
    mon = DriftMonitor(sessions)
    _add_results(sessions, ["normal"] * 9 + ["abnormal"])
    assert not mon.check(cfg).alarm and _drift_events(sessions) == []
    _add_results(sessions, ["abnormal"] * 5, start=100)  # 6 of 15 flagged at 5 %
    st = mon.check(cfg)
    assert st.alarm and st.window == 15 and st.flags == 6
    mon.check(cfg)
    assert DriftMonitor(sessions).check(cfg).alarm  # a restarted node: still one start event
    events = _drift_events(sessions)
    assert [k for k, _ in events] == [ALARM_EVENT]
    assert "6 of the last 15 assessable series flagged abnormal" in events[0][1]
    assert CANARY_NAME not in events[0][1] and CANARY_ID not in events[0][1]
    # normals push the flags out of the 20-series window: the alarm clears, once
    _add_results(sessions, ["normal"] * 20, start=200)
    assert not mon.check(cfg).alarm and not mon.check(cfg).alarm
    assert [k for k, _ in _drift_events(sessions)] == [ALARM_EVENT, CLEARED_EVENT]


def test_a_new_operating_point_starts_a_new_window(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    db.upgrade(url)
    sessions = db.session_factory(db.make_engine(url))
    cfg = AgentConfig(drift=DriftConfig(window=20, min_series=10))
    mon = DriftMonitor(sessions)
    _add_results(sessions, ["abnormal"] * 12)
    assert mon.check(cfg).alarm
    _add_results(sessions, ["normal"] * 3, sha="b" * 64, start=100)  # a site model was loaded
    st = mon.check(cfg)
    assert st.window == 3 and not st.tested and not st.alarm
    assert [k for k, _ in _drift_events(sessions)] == [ALARM_EVENT, CLEARED_EVENT]


# ----------------------------------------------------------------------------- the node


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_node_raises_the_drift_alarm_in_metrics_status_page_and_audit(
        node_factory, tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    # a threshold below every score: each head is flagged, far above the calibrated 5 %
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)},
        triage={"threshold": -1000.0},
        drift={"window": 5, "min_series": 3, "interval_s": 0.3},
    ).start()
    page = _get(node.http_port, "/")
    assert "Drift alarm" not in page
    text = _get(node.http_port, "/metrics")
    assert _gauge(text, "triage_drift_alarm") == 0 and _gauge(text, "triage_drift_window_series") == 0
    files = []
    for seed in (21, 22, 23):
        files += write_case_dicom(make_case(seed, "normal", matrix=64), tmp_path / f"h{seed}",
                                  patient_name=CANARY_NAME, patient_id=CANARY_ID)
    assert storescu(node.port, files).returncode == 0

    # the alarm needs all three series scored (min_series = 3)
    text = wait_for(lambda: (t := _get(node.http_port, "/metrics"))
                    and _gauge(t, "triage_drift_alarm") == 1 and t, 180, "the drift alarm")
    assert _gauge(text, "triage_drift_window_series") == 3
    assert _gauge(text, "triage_drift_observed_flag_rate") == 1.0
    assert _gauge(text, "triage_drift_expected_flag_rate") == pytest.approx(0.05)
    assert _gauge(text, "triage_drift_p_value") == pytest.approx(0.05 ** 3)
    assert math.isfinite(_gauge(text, "triage_drift_window_median_score"))
    page = _get(node.http_port, "/")
    assert "Drift alarm" in page and "scores no longer match the calibration" in page
    assert "triage-agent onboard" in page and "3 of the last 3 assessable series" in page
    with node.session()() as s:
        events = s.scalars(select(Event).where(Event.kind.in_((ALARM_EVENT, CLEARED_EVENT)))).all()
    assert [e.kind for e in events] == [ALARM_EVENT] and events[0].flagged
    for shown in (text, page, events[0].detail or ""):
        assert CANARY_NAME not in shown and CANARY_ID not in shown
