"""What one send attempt to a destination came to, for every kind of destination (DICOM C-STORE
in sender.py, HL7 v2 over MLLP in hl7.py); the sender turns it into the delivery row's state.

Also each destination's circuit breaker: after ``[delivery] breaker_failures`` attempts in a row
that got no answer at all, its delivery lane stops trying for a cool-down, then tries one
delivery (half-open) and resumes on success.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retried until [delivery] max_attempts
    PERMANENT = "permanent"  # dead letter at once


DELIVERED, TRANSIENT, PERMANENT = Outcome.DELIVERED, Outcome.TRANSIENT, Outcome.PERMANENT


@dataclass
class SendOutcome:
    kind: Outcome
    status: int | None
    error: str | None
    # Whether the destination answered at all. None: inferred (a transient failure without a
    # status, such as a refused connection, a timeout or an abort, is taken as no answer).
    answered: bool | None = None

    @property
    def unanswered(self) -> bool:
        if self.answered is not None:
            return not self.answered
        return self.kind == TRANSIENT and self.status is None


def went_unanswered(outcomes: Sequence[SendOutcome]) -> bool | None:
    """What the circuit breaker counts: True when the destination answered none of the objects
    sent (cannot connect, timed out, aborted), False when it answered (even with a failure
    status), None when nothing was sent."""
    if not outcomes:
        return None
    return all(o.unanswered for o in outcomes)


class CircuitState(enum.StrEnum):
    CLOSED = "closed"  # sending
    HALF_OPEN = "half-open"  # the cool-down is over: one delivery is tried
    OPEN = "open"  # not trying until the cool-down ends

    @property
    def gauge(self) -> int:
        """The ``triage_destination_circuit_state`` value: 0 closed, 1 half-open, 2 open."""
        return {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}[self]


class Permit(enum.Enum):
    NONE = "none"  # wait
    SEND = "send"  # closed: send as usual
    PROBE = "probe"  # half-open: send one delivery, whose outcome decides


class Transition(enum.StrEnum):
    OPENED = "opened"
    REOPENED = "reopened"  # the half-open probe went unanswered: open again, longer cool-down
    CLOSED = "closed"


def _hms(t: dt.datetime) -> str:
    return t.strftime("%H:%M:%S")


@dataclass(frozen=True)
class CircuitSnapshot:
    """A destination's breaker as the status page and the metrics show it (times naive UTC)."""

    destination: str
    state: CircuitState
    failures: int  # attempts in a row that got no answer
    opened_at: dt.datetime | None
    next_try_at: dt.datetime | None
    last_error: str | None

    def describe(self) -> str:
        """``"PACS_B: circuit open since 12:03:10 UTC, 5 failures in a row (last: ...), next
        try 12:05:10 UTC"``."""
        if self.state == CircuitState.CLOSED:
            return f"{self.destination}: sending"
        since = f" since {_hms(self.opened_at)} UTC" if self.opened_at else ""
        last = f" (last: {self.last_error})" if self.last_error else ""
        head = (f"{self.destination}: circuit {self.state}{since}, {self.failures} "
                f"failure{'s' if self.failures != 1 else ''} in a row{last}")
        if self.state == CircuitState.HALF_OPEN:
            return head + ", trying one delivery"
        return head + (f", next try {_hms(self.next_try_at)} UTC" if self.next_try_at else "")


class CircuitBreaker:
    """One destination's circuit breaker; thread-safe, so a lane's threads share it.

    Closed: every send goes. ``failures_to_open`` sends in a row unanswered: open for
    ``cooldown_s``. Then half-open: exactly one send (the probe) goes; answered -> closed,
    unanswered -> open again with the cool-down doubled (up to ``cooldown_cap_s``). Any answered
    send closes it. ``clock`` (monotonic seconds) and ``now`` (naive UTC) are injectable for tests.
    """

    def __init__(self, destination: str, failures_to_open: int = 3, cooldown_s: float = 60.0,
                 cooldown_cap_s: float = 600.0, *, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] | None = None) -> None:
        self.destination = destination
        self.failures_to_open = failures_to_open
        self.cooldown_base_s = cooldown_s
        self.cooldown_cap_s = max(cooldown_cap_s, cooldown_s)
        self._clock = clock
        self._now = now or (lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None))
        self._lock = threading.Lock()
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.cooldown_s = cooldown_s
        self.last_error: str | None = None
        self.opened_at: dt.datetime | None = None
        self._retry_at = 0.0  # clock time the cool-down ends
        self._probing = False

    def configure(self, failures_to_open: int, cooldown_s: float, cooldown_cap_s: float) -> None:
        """New settings (a reload); an open circuit keeps its current cool-down."""
        with self._lock:
            self.failures_to_open = failures_to_open
            self.cooldown_base_s = cooldown_s
            self.cooldown_cap_s = max(cooldown_cap_s, cooldown_s)
            if self.state == CircuitState.CLOSED:
                self.cooldown_s = cooldown_s

    def permit(self) -> Permit:
        """May a send start now? Past the cool-down an open circuit half-opens and lets exactly
        one send through."""
        with self._lock:
            if self.state == CircuitState.CLOSED:
                return Permit.SEND
            if self.state == CircuitState.OPEN and self._clock() >= self._retry_at:
                self.state = CircuitState.HALF_OPEN
            if self.state == CircuitState.HALF_OPEN and not self._probing:
                self._probing = True
                return Permit.PROBE
            return Permit.NONE

    def seconds_to_next_try(self) -> float:
        """0 while sends may go; otherwise until the cool-down ends (or a guess while probing)."""
        with self._lock:
            if self.state == CircuitState.CLOSED:
                return 0.0
            if self.state == CircuitState.OPEN:
                return max(0.0, self._retry_at - self._clock())
            return 1.0  # half-open: the probe is under way

    def record(self, unanswered: bool | None, error: str | None = None) -> Transition | None:
        """The outcome of a send this breaker permitted (None: nothing was sent). Returns the
        transition it caused, if any."""
        with self._lock:
            if unanswered is None:  # nothing to send: a probe leaves the circuit half-open
                self._probing = False
                return None
            if not unanswered:
                was = self.state
                self.state, self.failures, self._probing = CircuitState.CLOSED, 0, False
                self.cooldown_s, self.opened_at, self.last_error = self.cooldown_base_s, None, None
                return Transition.CLOSED if was != CircuitState.CLOSED else None
            self.failures += 1
            self.last_error = error
            if self.state == CircuitState.HALF_OPEN and self._probing:
                self._probing = False
                self.cooldown_s = min(self.cooldown_cap_s, self.cooldown_s * 2)
                self._open()
                return Transition.REOPENED
            if self.state == CircuitState.CLOSED and self.failures >= self.failures_to_open:
                self.cooldown_s = self.cooldown_base_s
                self.opened_at = self._now()
                self._open()
                return Transition.OPENED
            return None  # already open (another thread's send): counted only

    def _open(self) -> None:
        self.state = CircuitState.OPEN
        self._retry_at = self._clock() + self.cooldown_s

    def reset(self) -> Transition | None:
        """Close at once (the destination's settings changed)."""
        return self.record(False)

    def snapshot(self) -> CircuitSnapshot:
        with self._lock:
            next_try = None
            if self.state == CircuitState.OPEN:
                wait = max(0.0, self._retry_at - self._clock())
                next_try = self._now() + dt.timedelta(seconds=wait)
            return CircuitSnapshot(self.destination, self.state, self.failures, self.opened_at,
                                   next_try, self.last_error)
