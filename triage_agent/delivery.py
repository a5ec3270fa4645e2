"""What one send attempt to a destination came to, for every kind of destination (DICOM C-STORE
in sender.py, HL7 v2 over MLLP in hl7.py); the sender turns it into the delivery row's state."""

from __future__ import annotations

import enum
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
