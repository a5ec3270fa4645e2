"""The per-destination circuit breaker's state machine, and delivery lanes that keep a hung
destination from delaying a healthy one."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.factories import make_series
from tests.peers import StoreSCP
from tests.test_sender import _one_delivery
from triage_agent import db
from triage_agent.config import AgentConfig, DestinationConfig
from triage_agent.delivery import (
    DELIVERED,
    PERMANENT,
    TRANSIENT,
    CircuitBreaker,
    CircuitState,
    Permit,
    SendOutcome,
    Transition,
    went_unanswered,
)
from triage_agent.models import Delivery, DeliveryState, Event, Output
from triage_agent.sender import DeliveryLanes, Sender
from triage_agent.storage import Storage

T0 = dt.datetime(2026, 12, 3, 12, 3, 10)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def now(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.t)


def breaker(clock: Clock, **kw: Any) -> CircuitBreaker:
    return CircuitBreaker("PACS_B", kw.pop("failures", 3), kw.pop("cooldown", 60.0),
                          kw.pop("cap", 200.0), clock=clock, now=clock.now)


def test_opens_after_consecutive_unanswered_sends_only() -> None:
    c = Clock()
    b = breaker(c)
    assert b.record(True, "timeout") is None and b.record(True, "timeout") is None
    assert b.record(False) is None  # an answer (even a failure status) resets the count
    assert b.failures == 0 and b.permit() is Permit.SEND
    assert [b.record(True, "no response (timeout or abort)") for _ in range(3)] == [
        None, None, Transition.OPENED]
    assert b.state is CircuitState.OPEN and b.permit() is Permit.NONE
    snap = b.snapshot()
    assert snap.describe() == ("PACS_B: circuit open since 12:03:10 UTC, 3 failures in a row "
                               "(last: no response (timeout or abort)), next try 12:04:10 UTC")
    assert CircuitState.OPEN.gauge == 2 and CircuitState.CLOSED.gauge == 0


def test_half_open_lets_one_probe_through_then_closes_on_an_answer() -> None:
    c = Clock()
    b = breaker(c)
    for _ in range(3):
        b.record(True)
    c.t = 59.9
    assert b.permit() is Permit.NONE and b.seconds_to_next_try() == pytest.approx(0.1)
    c.t = 60.0
    assert b.permit() is Permit.PROBE  # exactly one send, whatever the number of threads
    assert b.state is CircuitState.HALF_OPEN and b.permit() is Permit.NONE
    assert "trying one delivery" in b.snapshot().describe()
    assert b.record(False) is Transition.CLOSED
    assert b.state is CircuitState.CLOSED and b.permit() is Permit.SEND and b.failures == 0


def test_unanswered_probe_reopens_with_doubled_cooldown_up_to_the_cap() -> None:
    c = Clock()
    b = breaker(c, cooldown=60.0, cap=200.0)
    for _ in range(3):
        b.record(True)
    waits = []
    for _ in range(4):
        c.t += b.seconds_to_next_try()
        assert b.permit() is Permit.PROBE
        assert b.record(True, "cannot connect") is Transition.REOPENED
        waits.append(b.seconds_to_next_try())
    assert waits == [120.0, 200.0, 200.0, 200.0]
    assert b.snapshot().opened_at == T0  # open since the first opening
    c.t += 200
    assert b.permit() is Permit.PROBE and b.record(False) is Transition.CLOSED
    for _ in range(3):  # a later outage starts again from the base cool-down
        b.record(True)
    assert b.seconds_to_next_try() == 60.0


def test_probe_with_nothing_to_send_stays_half_open() -> None:
    c = Clock()
    b = breaker(c, failures=1)
    assert b.record(True) is Transition.OPENED
    c.t = 60
    assert b.permit() is Permit.PROBE
    assert b.record(None) is None  # nothing was due: the next send is the probe
    assert b.state is CircuitState.HALF_OPEN and b.permit() is Permit.PROBE


def test_what_counts_as_no_answer() -> None:
    timeout = SendOutcome(TRANSIENT, None, "no response (timeout or abort)")
    busy = SendOutcome(TRANSIENT, 0xA700, "status 0xA700")
    rejected = SendOutcome(TRANSIENT, None, "association rejected", answered=True)
    assert went_unanswered([timeout, timeout]) is True
    assert went_unanswered([busy]) is False and went_unanswered([rejected]) is False
    assert went_unanswered([timeout, SendOutcome(DELIVERED, 0, None)]) is False
    assert went_unanswered([SendOutcome(PERMANENT, 0xA900, "x")]) is False
    assert went_unanswered([]) is None


class HungSCP:
    """Accepts TCP connections and never says a word (a hung PACS)."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def stop(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_lanes_keep_a_hung_destination_from_delaying_a_healthy_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.session_factory(engine)
    storage = Storage(tmp_path / "storage")
    hung, pacs = HungSCP(), StoreSCP(tmp_path / "pacs")
    cfg = AgentConfig(destinations=[
        DestinationConfig(name="hung", ae_title="PACS", host="127.0.0.1", port=hung.port),
        pacs.dest()])
    cfg = cfg.model_copy(update={"delivery": cfg.delivery.model_copy(update={
        "timeout_s": 1.0, "interval_s": 0.1, "backoff_base_s": 0.05, "backoff_cap_s": 0.1,
        "breaker_failures": 2, "breaker_cooldown_s": 30.0})})
    src = make_series(tmp_path / "ct", n=1, seed=3, size=32)[0]
    ids = _one_delivery(sessions, storage, src, "hung")
    with sessions() as s, s.begin():
        output_id = s.get(Delivery, ids).output_id
        s.add(Delivery(output_id=output_id, destination="pacs"))
    audited: list[tuple[str, str]] = []
    lanes = DeliveryLanes(Sender(cfg, sessions, storage), lambda k, d: audited.append((k, d)))
    t0 = time.monotonic()
    try:
        lanes.sync()
        while time.monotonic() - t0 < 10 and not list(pacs.out.iterdir()):
            time.sleep(0.02)
        healthy_s = time.monotonic() - t0
        assert healthy_s < 0.9  # well inside the hung one's 1 s timeout
        while time.monotonic() - t0 < 15 and not audited:
            time.sleep(0.05)
        (hung_c,) = [c for c in lanes.circuits() if c.destination == "hung"]
        assert hung_c.state is CircuitState.OPEN and hung_c.failures == 2
        assert audited and audited[0][0] == "circuit_opened"
        assert audited[0][1].startswith("hung: 2 delivery attempts in a row unanswered")
        time.sleep(0.5)  # open: nothing is claimed, so no attempt is spent
        with sessions() as s:
            rows = {d.destination: d for d in s.scalars(select(Delivery))}
            assert rows["pacs"].state == DeliveryState.DELIVERED and rows["pacs"].attempts == 1
            assert rows["hung"].state == DeliveryState.PENDING and rows["hung"].attempts == 2
            assert s.scalar(select(Output.id)) == output_id
            assert not s.scalars(select(Event).where(Event.kind == "delivery_dead")).all()
    finally:
        lanes.stop(0.1)
        hung.stop()
        pacs.stop()
        engine.dispose()


def test_deliveries_to_a_destination_no_longer_configured_are_dead_lettered(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.session_factory(engine)
    storage = Storage(tmp_path / "storage")
    did = _one_delivery(sessions, storage, make_series(tmp_path / "ct", n=1, seed=4, size=32)[0],
                        "old-pacs")
    lanes = DeliveryLanes(Sender(AgentConfig(), sessions, storage))
    try:
        lanes.sync()  # no lane takes "old-pacs": the ledger says why it was not sent
        assert lanes.circuits() == []
        with sessions() as s:
            d = s.get(Delivery, did)
            assert d is not None and d.state == DeliveryState.DEAD
            assert d.last_error == "destination no longer configured"
    finally:
        lanes.stop(0.1)
        engine.dispose()
