"""Which queued series is scored next: a short series is not stuck behind a long one queued just
before it, a long one is not passed forever, and idle workers wake when a job is queued."""

from __future__ import annotations

import datetime as dt
import threading
import time

from triage_agent import queue
from triage_agent.models import Job, Series, SeriesState, Study, utcnow


def _queue(sessions, slices: int, queued_s_ago: float) -> int:  # type: ignore[no-untyped-def]
    """A queued job for a series of ``slices`` slices, queued ``queued_s_ago`` seconds ago."""
    with sessions() as s, s.begin():
        n = s.query(Study).count()
        st = Study(study_instance_uid=f"1.2.9.{n}")
        s.add(st)
        s.flush()
        se = Series(series_instance_uid=f"1.2.9.{n}.1", study_id=st.id, generation=1,
                    state=SeriesState.QUEUED, instance_count=slices, frame_count=slices)
        s.add(se)
        s.flush()
        at = utcnow() - dt.timedelta(seconds=queued_s_ago)
        j = Job(series_id=se.id, generation=1, created_at=at, available_at=at)
        s.add(j)
        s.flush()
        return j.id


def _claim_order(sessions) -> list[int]:  # type: ignore[no-untyped-def]
    order: list[int] = []
    while True:
        with sessions() as s, s.begin():
            job = queue.claim(s, "w", lease_s=60, max_attempts=3)
            if job is None:
                return order
            order.append(job.id)
            queue.complete(s, job)


def test_short_series_queued_just_after_a_long_one_is_scored_first(sessions) -> None:  # type: ignore[no-untyped-def]
    long_ = _queue(sessions, 300, queued_s_ago=3.0)
    short = _queue(sessions, 40, queued_s_ago=1.0)
    assert _claim_order(sessions) == [short, long_]


def test_long_series_is_not_passed_by_series_queued_much_later(sessions) -> None:  # type: ignore[no-untyped-def]
    long_ = _queue(sessions, 2000, queued_s_ago=queue.HANDICAP_CAP_S + 5)
    short = _queue(sessions, 40, queued_s_ago=1.0)
    assert _claim_order(sessions) == [long_, short]


def test_equal_series_are_scored_first_come_first_served(sessions) -> None:  # type: ignore[no-untyped-def]
    ids = [_queue(sessions, 40, queued_s_ago=10.0 - i) for i in range(4)]
    assert _claim_order(sessions) == ids


def test_higher_priority_goes_first_whatever_its_size(sessions) -> None:  # type: ignore[no-untyped-def]
    short = _queue(sessions, 40, queued_s_ago=5.0)
    urgent = _queue(sessions, 300, queued_s_ago=1.0)
    with sessions() as s, s.begin():
        s.get(Job, urgent).priority = 1
    assert _claim_order(sessions) == [urgent, short]


def test_idle_worker_wakes_when_a_job_is_queued() -> None:
    signal = queue.QueueSignal()
    since = signal.mark()
    woke: list[float] = []

    def idle() -> None:
        t0 = time.monotonic()
        signal.wait(since, timeout_s=30.0)
        woke.append(time.monotonic() - t0)

    t = threading.Thread(target=idle)
    t.start()
    time.sleep(0.1)
    signal.notify()
    t.join(5)
    assert woke and woke[0] < 2.0
    # a notify before the wait began is not lost
    since = signal.mark()
    signal.notify()
    assert signal.wait(since, timeout_s=0.0)


def test_series_wait_for_the_detector_one_at_a_time_in_arrival_order() -> None:
    from triage_agent.inference import ModelGate

    gate = ModelGate(1)
    inside, entered, peak = [0], [], [0]
    lock = threading.Lock()

    def score(i: int) -> None:
        with gate:
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
                entered.append(i)
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = []
    with gate:  # the detector is busy while five series arrive, in order 0..4
        for i in range(5):
            threads.append(threading.Thread(target=score, args=(i,)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while gate._next_ticket < i + 2 and time.monotonic() < deadline:
                time.sleep(0.001)  # until this one waits in line
    for t in threads:
        t.join(10)
    assert entered == [0, 1, 2, 3, 4] and peak[0] == 1


def test_large_series_are_read_one_at_a_time_small_ones_side_by_side() -> None:
    from triage_agent.inference import MemoryBudget

    budget = MemoryBudget(1000)
    inside, peak = [0], [0]
    lock = threading.Lock()

    def read(nbytes: int) -> None:
        with budget.hold(nbytes):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.1)
            with lock:
                inside[0] -= 1

    def run(sizes: list[int]) -> int:
        peak[0] = 0
        threads = [threading.Thread(target=read, args=(n,)) for n in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return peak[0]

    assert run([900, 900, 900]) == 1  # thin series: one volume in memory at a time
    assert run([200, 200, 200]) == 3  # small series are read side by side
    assert run([5000]) == 1  # larger than the whole budget: still read, alone
