"""What one send attempt to a destination came to, for every kind of destination (DICOM C-STORE
in sender.py, HL7 v2 over MLLP in hl7.py); the sender turns it into the delivery row's state."""

from __future__ import annotations

from dataclasses import dataclass

DELIVERED, TRANSIENT, PERMANENT = "delivered", "transient", "permanent"


@dataclass
class SendOutcome:
    kind: str  # DELIVERED | TRANSIENT | PERMANENT
    status: int | None
    error: str | None
