"""DICOM facts shared by the receiver, ingest and series completion: which SOP classes are the
images the node scores, and what a valid UID looks like."""

from __future__ import annotations

import re
from typing import Any

from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

# Images the node scores; other accepted SOP classes (storage.extra_sop_classes) are stored and
# ignored.
IMAGE_SOP_CLASSES = (str(CTImageStorage), str(EnhancedCTImageStorage))

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: Any) -> bool:
    """A UID as PS3.5 9.1 defines it: dot-separated numbers without leading zeros, <= 64 chars."""
    return isinstance(value, str) and len(value) <= 64 and bool(UID_RE.fullmatch(value))
