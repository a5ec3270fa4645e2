"""Selection rules: is this completed series a head CT the detector can read?

``skip_reason`` is the pure rule the node applies to a completed series, with a human-readable
reason for every refusal (shown by ``triage-agent status``). ``select_series`` applies the same
rule to folders of DICOM files, for the commands that score or onboard outside the node
(``score``, ``onboard``, ``onboard --from-pacs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from triage_agent.config import SeriesConfig
from triage_agent.ingest import classify_orientation, short_id


@dataclass(frozen=True)
class SeriesFacts:
    modality: str | None
    body_part: str | None
    series_description: str | None
    instance_count: int
    slice_thickness_mm: float | None
    orientation: str | None  # "axial:2.0" = plane and tilt in degrees


def skip_reason(facts: SeriesFacts, rules: SeriesConfig) -> str | None:
    """None when the series should be scored, else why it is skipped."""
    modality = (facts.modality or "").upper()
    if rules.modalities and modality not in {m.upper() for m in rules.modalities}:
        return f"modality {modality or 'missing'}"
    body = (facts.body_part or "").upper()
    if rules.body_parts and body not in {b.upper() for b in rules.body_parts}:
        return f"body part {body}"
    desc = facts.series_description or ""
    for pattern in rules.description_exclude:
        if re.search(pattern, desc):
            return f"series description matches exclusion {pattern!r}"
    if rules.description_include and not any(
        re.search(p, desc) for p in rules.description_include
    ):
        return "series description matches no inclusion pattern"
    if rules.axial_only:
        if facts.orientation is None:
            return "no image orientation"
        plane, _, tilt = facts.orientation.partition(":")
        if plane != "axial":
            return f"{plane} reformat"
        if tilt and float(tilt) > rules.axial_tolerance_deg:
            return f"axial tilt {float(tilt):.0f} degrees exceeds {rules.axial_tolerance_deg:.0f}"
    lo, hi = rules.slice_thickness_mm
    if facts.slice_thickness_mm is not None and not lo <= facts.slice_thickness_mm <= hi:
        return f"slice thickness {facts.slice_thickness_mm:g} mm outside {lo:g}-{hi:g} mm"
    if facts.instance_count < rules.min_slices:
        n = facts.instance_count
        return f"only {n} slice{'s' if n != 1 else ''} (minimum {rules.min_slices})"
    return None


@dataclass(frozen=True)
class Skipped:
    series: str  # short SeriesInstanceUID (never patient identifiers)
    reason: str


def series_facts(files: list[Path]) -> SeriesFacts:
    """What the node's selection rules look at, from the series' first readable header."""
    import pydicom

    ds = None
    for f in sorted(files):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            break
        except Exception:  # noqa: BLE001 - unreadable files are the reader's problem later
            continue
    if ds is None:
        return SeriesFacts(None, None, None, len(files), None, None)

    def text(keyword: str) -> str | None:
        v = ds.get(keyword)
        return None if v in (None, "") else str(v)

    try:
        thickness = float(ds.get("SliceThickness")) if ds.get("SliceThickness") not in (
            None, "") else None
    except (TypeError, ValueError):
        thickness = None
    iop = ds.get("ImageOrientationPatient")
    return SeriesFacts(text("Modality"), text("BodyPartExamined"), text("SeriesDescription"),
                       len(files), thickness, classify_orientation(iop) if iop else None)


def select_series(groups: dict[str, list[Path]], rules: SeriesConfig
                  ) -> tuple[dict[str, list[Path]], list[Skipped]]:
    """The series the node would score, and those it would skip with the reason."""
    kept: dict[str, list[Path]] = {}
    skipped: list[Skipped] = []
    for uid, files in sorted(groups.items()):
        reason = skip_reason(series_facts(files), rules)
        if reason is None:
            kept[uid] = files
        else:
            skipped.append(Skipped(short_id(uid), reason))
    return kept, skipped
