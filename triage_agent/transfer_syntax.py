"""Transfer syntaxes: which ones the node accepts, how it reads what arrives in them, and which
refused presentation contexts are worth a trace.

Instances are stored as received (never transcoded); pydicom decodes the compressed pixel data
with the pylibjpeg plugins when the series is read for scoring. Deflated Explicit VR is accepted
too, but inflated here with a bound (``max_dataset_mb``) instead of by pynetdicom, which would
inflate whatever a peer sends: a few kilobytes can expand to gigabytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

# In the node's order of preference when one proposed context offers several: uncompressed and
# lossless first, lossy last (pynetdicom picks the first of ours that the peer proposed).
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,  # JPEG Lossless, process 14 SV1: what most PACS and routers store
    JPEGLossless,  # JPEG Lossless, process 14, any predictor
    JPEGLSLossless,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSNearLossless,
    JPEG2000,  # lossless or lossy, as the sender chose
)


class DatasetTooLarge(ValueError):
    """A deflated dataset inflates beyond the configured limit."""


def inflate_bounded(data: bytes, limit_bytes: int) -> bytes:
    """Inflate a raw deflate stream (DICOM PS3.5 A.5), refusing to produce more than
    ``limit_bytes``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit_bytes)
    except zlib.error as e:
        raise ValueError(f"deflated dataset is corrupt: {e}") from e
    if inflater.unconsumed_tail:
        raise DatasetTooLarge(f"deflated dataset inflates beyond {limit_bytes} bytes")
    return out


def received_dataset(event: Any, limit_bytes: int) -> Dataset:
    """The C-STORE request's dataset, decoded; a deflated one is inflated with a bound."""
    ts = UID(str(event.context.transfer_syntax))
    if ts != DeflatedExplicitVRLittleEndian:
        return event.dataset  # type: ignore[no-any-return]
    raw = event.request.DataSet.getvalue()
    ds = read_dataset(BytesIO(inflate_bounded(raw, limit_bytes)), is_implicit_VR=False,
                      is_little_endian=True)
    ds.set_original_encoding(False, True)
    return ds


@dataclass(frozen=True)
class RefusedProposal:
    """A SOP class a peer proposed that the association cannot carry."""

    sop_class: str  # UID
    transfer_syntaxes: tuple[str, ...]  # every UID proposed for it
    reason: str  # "sop_class" | "transfer_syntax"

    @property
    def sop_class_name(self) -> str:
        return UID(self.sop_class).name

    def describe(self) -> str:
        names = ", ".join(UID(t).name for t in self.transfer_syntaxes) or "no transfer syntax"
        why = ("SOP class not accepted" if self.reason == "sop_class"
               else "none of its transfer syntaxes is accepted")
        return f"{self.sop_class_name} ({names}): {why}"


VERIFICATION = "1.2.840.10008.1.1"


def refused_proposals(proposed: Iterable[Any], accepted_sop_classes: Sequence[str],
                      accepted_context_ids: Iterable[int],
                      instances_received: int) -> list[RefusedProposal]:
    """The refusals worth a trace, from an association's proposed presentation contexts.

    Senders like DCMTK ``storescu`` propose every storage SOP class they know (128 contexts), so
    a refused context alone means nothing. Worth a trace: a SOP class the node accepts for which
    no proposed transfer syntax was accepted (a CT offered only in a syntax the node cannot
    take), and, when the association stored no instance at all, the SOP classes it proposed and
    the node refused (an MR router pointed at the node).
    """
    accepted_ids = set(accepted_context_ids)
    by_class: dict[str, tuple[list[str], bool]] = {}
    for cx in proposed:
        uid = str(cx.abstract_syntax)
        syntaxes, ok = by_class.get(uid, ([], False))
        syntaxes.extend(str(t) for t in cx.transfer_syntax if str(t) not in syntaxes)
        by_class[uid] = (syntaxes, ok or cx.context_id in accepted_ids)
    ours = set(accepted_sop_classes)
    refused = [RefusedProposal(uid, tuple(ts), "transfer_syntax")
               for uid, (ts, ok) in by_class.items() if uid in ours and not ok]
    if instances_received == 0:
        refused += [RefusedProposal(uid, tuple(ts), "sop_class")
                    for uid, (ts, ok) in by_class.items()
                    if uid not in ours and uid != VERIFICATION and not ok]
    return refused


def metric_label(uid: str) -> str:
    """A bounded metric label: the dictionary name of a standard UID, else "other" (a peer must
    not be able to create label values at will)."""
    name = UID(uid).name
    return "other" if name == uid else name


def summarise(refused: Sequence[RefusedProposal], limit: int = 4) -> str:
    """One line for the audit trail and the status page (UIDs and names only, no identifiers)."""
    shown = "; ".join(r.describe() for r in refused[:limit])
    more = len(refused) - limit
    return shown + (f"; and {more} more SOP classes" if more > 0 else "")
