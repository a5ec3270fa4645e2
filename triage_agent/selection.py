"""Selection rules: is this completed series a head CT the detector can read, and which one
series of a study is reported?

``skip_reason`` is the pure rule the node applies to a completed series, with a human-readable
reason for every refusal (shown by ``triage-agent status``). ``choose`` is the study rule: of a
study's eligible series (those ``skip_reason`` lets through) it picks the one to score, ranked
by ``rank_key``: not a bone/sharp reconstruction (``avoid_kernel``, ``avoid_description``), a
``prefer_description`` match, slice thickness closest to ``preferred_thickness_mm``, most
images, then the lowest SeriesNumber and SeriesInstanceUID. ``select_series`` applies both rules
to folders of DICOM files, for the commands that score or onboard outside the node (``score``,
``onboard``, ``onboard --from-pacs``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from triage_agent.config import SeriesConfig
from triage_agent.dicom_uids import image_facts
from triage_agent.ingest import classify_orientation, short_id


@dataclass(frozen=True)
class SeriesFacts:
    modality: str | None
    body_part: str | None
    series_description: str | None
    instance_count: int
    slice_thickness_mm: float | None
    orientation: str | None  # "axial:2.0" = plane and tilt in degrees
    kernel: str | None = None  # ConvolutionKernel
    series_number: int | None = None
    study_uid: str | None = None
    series_uid: str = ""


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


def is_sharp(facts: SeriesFacts, rules: SeriesConfig) -> bool:
    """A bone/sharp/lung reconstruction, by its ConvolutionKernel or SeriesDescription."""
    kernel, desc = facts.kernel or "", facts.series_description or ""
    return (bool(kernel) and any(re.search(p, kernel) for p in rules.avoid_kernel)) or any(
        re.search(p, desc) for p in rules.avoid_description)


def rank_key(facts: SeriesFacts, rules: SeriesConfig) -> tuple[Any, ...]:
    """Sort key of the study rule; the smallest key is the series that is scored."""
    desc = facts.series_description or ""
    preferred = any(re.search(p, desc) for p in rules.prefer_description)
    t = facts.slice_thickness_mm
    distance = abs(t - rules.preferred_thickness_mm) if t is not None else math.inf
    number = facts.series_number if facts.series_number is not None else 2**31
    return (is_sharp(facts, rules), not preferred, round(distance, 3), -facts.instance_count,
            number, facts.series_uid)


def why_chosen(chosen: SeriesFacts, other: SeriesFacts, rules: SeriesConfig) -> str:
    """The first criterion of the study rule that put ``chosen`` before ``other``."""
    a, b = rank_key(chosen, rules), rank_key(other, rules)
    if a[0] != b[0]:
        return "soft-tissue reconstruction preferred over bone/sharp"
    if a[1] != b[1]:
        return "series description matches prefer_description"
    if a[2] != b[2]:
        ct, ot = chosen.slice_thickness_mm, other.slice_thickness_mm
        pref = f"{rules.preferred_thickness_mm:g} mm"
        if ot is None:
            return f"slice thickness {ct:g} mm known, closest to {pref}"
        return f"slice thickness {ct:g} mm closer to {pref} than {ot:g} mm"
    if a[3] != b[3]:
        return f"more images ({chosen.instance_count} vs {other.instance_count})"
    if a[4] != b[4]:
        return "lower series number"
    return "same rank, first SeriesInstanceUID"


def study_reason(study_uid: str | None, chosen: SeriesFacts, why: str) -> str:
    """The skip reason of a series that lost to ``chosen`` (UIDs shortened, no identifiers)."""
    return f"study {short_id(study_uid)}: series {short_id(chosen.series_uid)} chosen ({why})"


def choose(eligible: list[SeriesFacts], rules: SeriesConfig
           ) -> tuple[SeriesFacts, dict[str, str]]:
    """The series of one study to score, and the skip reason of each other eligible series
    (by SeriesInstanceUID)."""
    if not eligible:
        raise ValueError("choose needs at least one eligible series")
    ranked = sorted(eligible, key=lambda f: rank_key(f, rules))
    best = ranked[0]
    return best, {f.series_uid: study_reason(f.study_uid, best, why_chosen(best, f, rules))
                  for f in ranked[1:]}


@dataclass(frozen=True)
class Skipped:
    series: str  # short SeriesInstanceUID (never patient identifiers)
    reason: str


def series_facts(files: list[Path]) -> SeriesFacts:
    """What the node's selection rules look at, from the series' first readable header (every
    header of a multi-frame series, whose images are frames)."""
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

    img = image_facts(ds)
    images = len(files)
    if img.frames > 1:
        images = 0
        for f in files:
            try:
                images += image_facts(pydicom.dcmread(f, stop_before_pixels=True)).frames
            except Exception:  # noqa: BLE001 - as above
                continue
    try:
        number = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    iop = img.orientation
    return SeriesFacts(text("Modality"), img.body_part, text("SeriesDescription"),
                       images, img.slice_thickness_mm,
                       classify_orientation(iop) if iop else None, kernel=img.kernel,
                       series_number=number, study_uid=text("StudyInstanceUID"),
                       series_uid=text("SeriesInstanceUID") or "")


def skip_reasons(groups: dict[str, list[Path]], rules: SeriesConfig) -> dict[str, str | None]:
    """Per SeriesInstanceUID, why the node would skip that series (None: it would score it):
    first each series' own rules, then (``report = "one_per_study"``) one series per study."""
    reasons: dict[str, str | None] = {}
    eligible: list[SeriesFacts] = []
    for uid, files in sorted(groups.items()):
        facts = series_facts(files)
        reasons[uid] = skip_reason(facts, rules)
        if reasons[uid] is None:
            eligible.append(replace(facts, series_uid=uid))
    if rules.report == "one_per_study":
        by_study: dict[str, list[SeriesFacts]] = {}
        for facts in eligible:
            by_study.setdefault(facts.study_uid or facts.series_uid, []).append(facts)
        for members in by_study.values():
            reasons.update(choose(members, rules)[1])
    return reasons


def select_series(groups: dict[str, list[Path]], rules: SeriesConfig
                  ) -> tuple[dict[str, list[Path]], list[Skipped]]:
    """The series the node would score, and those it would skip with the reason."""
    reasons = skip_reasons(groups, rules)
    kept = {uid: groups[uid] for uid, r in sorted(reasons.items()) if r is None}
    skipped = [Skipped(short_id(uid), r) for uid, r in sorted(reasons.items()) if r is not None]
    return kept, skipped
