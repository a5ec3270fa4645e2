"""Triage verdict -> DICOM Comprehensive 3D SR (TID 1500 measurement report).

Why an SR: it is the one object every PACS stores and most viewers render without a plug-in,
and its coded content lets a worklist rule ("finding = abnormal -> put first") act on the
verdict without parsing free text. The report is built with highdicom, whose template classes
validate the content tree in their constructors.

Coded concepts (all standard except for priority band names outside the known set):

* procedure reported: SCT 303653007 "Computed tomography of head";
* verdict: a qualitative evaluation named SCT 365853002 "Imaging finding" (not DCM 121071
  "Finding", which TID 1501 uses for the finding type and highdicom's reader skips) with value
  SCT 263654008 "Abnormal", SCT 17621005 "Normal" or, for "not assessable", SCT 82334004
  "Indeterminate" (SNOMED has no pre-coordinated "not assessable" qualifier in the DICOM code
  tables; the reason is written next to it as a DCM 121106 "Comment");
* priority: a qualitative evaluation named SCT 260870009 "Priority" with a SNOMED "Priorities"
  value (urgent 103391001, high 394849002, routine 50811001, ...); band names without a SNOMED
  counterpart use the private scheme ``99TRIAGE`` declared in CodingSchemeIdentificationSequence;
* series anomaly score: SCT 246262008 "Score"; threshold: DCM 122411 "Threshold Value"; both
  unitless (UCUM ``{score}``); per-slice scores: SCT 246262008 "Score", one measurement group
  per highest-scoring slice, ranked by score ("Suspicious slice" only at or above the threshold
  of an abnormal series), each naming where the slice lies in its tracking identifier
  ("Suspicious slice 1 of 5: image 13, z 45.0 mm") and referencing its source image (TID 300
  "Source of measurement");
* algorithm: TID 4019 Algorithm Identification (name, version, parameters holding the weights
  SHA-256) in every measurement group; the device observer names the algorithm too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from triage_agent.ingest import short_id
from triage_agent.outputs.common import (
    AlgorithmInfo,
    OutputError,
    TopSlice,
    TriageFinding,
    clip_lo,
    derive_uid,
    format_score,
    index_source,
    is_suspicious,
    pin_times,
    slice_label,
    sorted_source,
    split_datetime,
    top_slice_headers,
    validate_algorithm,
    validate_finding,
    verdict_label,
)

log = logging.getLogger(__name__)

__all__ = [
    "AlgorithmInfo",
    "TriageFinding",
    "build_sr",
    "derive_uid",
    "PRIVATE_SCHEME",
    "VERDICT_CODES",
    "PRIORITY_CODES",
]

#: Private coding scheme for concepts without a standard code (priority band names only).
PRIVATE_SCHEME = "99TRIAGE"

PROCEDURE_CT_HEAD = CodedConcept("303653007", "SCT", "Computed tomography of head")
VERDICT = CodedConcept("365853002", "SCT", "Imaging finding")
PRIORITY = CodedConcept("260870009", "SCT", "Priority")
SCORE = CodedConcept("246262008", "SCT", "Score")
THRESHOLD = CodedConcept("122411", "DCM", "Threshold Value")
COMMENT = CodedConcept("121106", "DCM", "Comment")
UNIT_SCORE = CodedConcept("{score}", "UCUM", "score")
BRAIN = CodedConcept("12738006", "SCT", "Brain")

VERDICT_CODES: dict[str, CodedConcept] = {
    "abnormal": CodedConcept("263654008", "SCT", "Abnormal"),
    "normal": CodedConcept("17621005", "SCT", "Normal"),
    "not_assessable": CodedConcept("82334004", "SCT", "Indeterminate"),
}

#: SNOMED CT "Priorities" (272125009) children for the band names a site is likely to use.
PRIORITY_CODES: dict[str, CodedConcept] = {
    "stat": CodedConcept("49499008", "SCT", "Stat"),
    "immediate": CodedConcept("88694003", "SCT", "Immediate"),
    "emergency": CodedConcept("25876001", "SCT", "Emergency"),
    "urgent": CodedConcept("103391001", "SCT", "Urgent"),
    "high": CodedConcept("394849002", "SCT", "High priority"),
    "normal": CodedConcept("394848005", "SCT", "Normal priority"),
    "routine": CodedConcept("50811001", "SCT", "Routine"),
    "low": CodedConcept("1251527002", "SCT", "Low priority"),
}


def priority_code(priority: str) -> CodedConcept:
    """SNOMED code for a priority band; a private-scheme code for site-specific band names."""
    key = priority.strip().lower()
    if key in PRIORITY_CODES:
        return PRIORITY_CODES[key]
    value = "".join(c if c.isalnum() else "_" for c in key.upper())[:16] or "UNKNOWN"
    return CodedConcept(value, PRIVATE_SCHEME, priority.strip()[:64])


def _algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the weights hash goes into the parameters so two builds of the same version
    with different weights stay distinguishable."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"weights_sha256={algorithm.weights_sha256}"],
    )


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=COMMENT,
        value=text[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def build_sr(
    source: Sequence[pydicom.Dataset],
    finding: TriageFinding,
    algorithm: AlgorithmInfo,
    *,
    uid_key: str,
    series_description: str = "AI TRIAGE REPORT",
    supersedes: pydicom.Dataset | None = None,
    series_number: int = 9901,
    instance_number: int = 1,
    content_datetime: datetime | None = None,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the triage report for one CT series.

    ``uid_key`` names the job (series UID, generation, weights hash): every UID of the report
    derives from it, so rebuilding after a crash gives the same SOP Instance UID and the PACS
    keeps one object. ``supersedes`` is the earlier report of the same series (before late
    slices arrived); it is listed in the Predecessor Documents Sequence and named in a
    comment, and must have been built from a different ``uid_key``. ``content_datetime`` fixes
    Content/Series Date and Time (default: now), which makes rebuilds byte-identical in tests.
    """
    if not uid_key:
        raise OutputError("uid_key must not be empty")
    validate_finding(finding)
    validate_algorithm(algorithm)
    by_uid = index_source(source)
    evidence = sorted_source(source)
    top = top_slice_headers(finding, by_uid)
    sop_uid = derive_uid(uid_key, "sr-instance")
    _check_supersedes(supersedes, sop_uid, evidence[0])

    algo_id = _algorithm_id(algorithm)
    groups = [_series_group(finding, algo_id, uid_key, supersedes)]
    groups += [
        _slice_group(
            ts,
            rank,
            len(top),
            algo_id,
            uid_key,
            suspicious=is_suspicious(finding, ts.score),
        )
        for rank, ts in enumerate(top, start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=PROCEDURE_CT_HEAD,
        imaging_measurements=groups,
    )
    sr = _document(
        evidence,
        report,
        finding,
        algorithm,
        series_uid=derive_uid(uid_key, "sr-series"),
        sop_uid=sop_uid,
        series_description=series_description,
        supersedes=supersedes,
        series_number=series_number,
        instance_number=instance_number,
        content_datetime=content_datetime,
        institution_name=institution_name,
    )
    pin_times(sr, content_datetime)
    log.info(
        "built SR %s (verdict %s, score %s, %d slice refs%s)",
        short_id(sop_uid),
        finding.verdict,
        format_score(finding.score),
        len(top),
        ", supersedes earlier report" if supersedes is not None else "",
    )
    return sr


def _check_supersedes(
    supersedes: pydicom.Dataset | None, sop_uid: str, source: pydicom.Dataset
) -> None:
    """An earlier report must have a UID other than ours and belong to the source's study."""
    if supersedes is None:
        return
    old_uid = str(getattr(supersedes, "SOPInstanceUID", ""))
    if not old_uid:
        raise OutputError("supersedes has no SOPInstanceUID")
    if old_uid == sop_uid:
        raise OutputError(
            "supersedes has the UID this report would get: a superseding report needs a "
            "different uid_key (e.g. the next generation of the series)"
        )
    if str(getattr(supersedes, "StudyInstanceUID", "")) != str(source.StudyInstanceUID):
        raise OutputError("supersedes belongs to a different study than the source")


def _observation_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
    """The algorithm as the device observer of the report."""
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", algorithm.manufacturer, algorithm.name),
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}"[:64],
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=device)


def _series_group(
    finding: TriageFinding,
    algo_id: hd.sr.AlgorithmIdentification,
    uid_key: str,
    supersedes: pydicom.Dataset | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Series-level group: score and threshold, verdict and priority, and the comments (reason,
    superseded report, "not for diagnosis")."""
    measurements = [
        hd.sr.Measurement(
            name=THRESHOLD, value=float(finding.threshold), unit=UNIT_SCORE, algorithm_id=algo_id
        )
    ]
    if finding.score is not None:
        measurements.insert(
            0,
            hd.sr.Measurement(
                name=SCORE, value=float(finding.score), unit=UNIT_SCORE, algorithm_id=algo_id
            ),
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(uid_key, "sr-track", "series"), identifier="AI triage of series"
        ),
        algorithm_id=algo_id,
        finding_sites=[hd.sr.FindingSite(anatomic_location=BRAIN)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=VERDICT, value=VERDICT_CODES[finding.verdict]),
            hd.sr.QualitativeEvaluation(name=PRIORITY, value=priority_code(finding.priority)),
        ],
    )
    notes = []
    if finding.reason:
        notes.append(f"Reason: {finding.reason}")
    if supersedes is not None:
        notes.append(f"Supersedes AI triage report {supersedes.SOPInstanceUID}")
    notes.append("AI triage, not for diagnosis")
    # the group is a one-item sequence holding the TID 1501 container: comments go inside it
    for note in notes:
        group[0].ContentSequence.append(_comment(note))
    return group


def _slice_group(
    ts: TopSlice,
    rank: int,
    count: int,
    algo_id: hd.sr.AlgorithmIdentification,
    uid_key: str,
    *,
    suspicious: bool,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Group of the ``rank``-th highest-scoring slice: its score and position, referencing its
    image. Only a slice of an abnormal series scoring at or above the threshold is called
    suspicious. A frame of a multi-frame image is referenced by its frame number."""
    ds = ts.header
    frames = [ts.frame] if ts.frame is not None else None
    ref = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=str(ds.SOPClassUID),
        referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        referenced_frame_numbers=frames,
    )
    where = slice_label(ds, ts.frame)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(uid_key, "sr-track", "slice", str(rank)),
            identifier=(
                f"Suspicious slice {rank} of {count}: {where}"
                if suspicious
                else f"Highest-scoring slice {rank} of {count}: {where}"
            ),
        ),
        algorithm_id=algo_id,
        finding_sites=[hd.sr.FindingSite(anatomic_location=BRAIN)],
        measurements=[
            hd.sr.Measurement(
                name=SCORE,
                value=ts.score,
                unit=UNIT_SCORE,
                algorithm_id=algo_id,
                referenced_images=[ref],
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                referenced_frame_numbers=frames,
            )
        ],
    )


def _document(
    evidence: list[pydicom.Dataset],
    report: hd.sr.MeasurementReport,
    finding: TriageFinding,
    algorithm: AlgorithmInfo,
    *,
    series_uid: str,
    sop_uid: str,
    series_description: str,
    supersedes: pydicom.Dataset | None,
    series_number: int,
    instance_number: int,
    content_datetime: datetime | None,
    institution_name: str | None,
) -> hd.sr.Comprehensive3DSR:
    """The SR document around the content tree: series, equipment, dates, coding schemes."""
    coding_schemes = []
    if priority_code(finding.priority).scheme_designator == PRIVATE_SCHEME:
        coding_schemes.append(
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="Triage agent local codes",
                responsible_organization=algorithm.manufacturer[:64],
            )
        )
    day, time = split_datetime(content_datetime)
    prefix = series_description.strip()
    description = clip_lo(
        f"{prefix}: {verdict_label(finding.verdict)}" if prefix else verdict_label(finding.verdict)
    )
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer[:64],
            is_complete=True,
            is_final=True,
            is_verified=False,
            institution_name=institution_name,
            previous_versions=[supersedes] if supersedes is not None else None,
            series_description=description,
            manufacturer_model_name=algorithm.name[:64],
            software_versions=algorithm.version[:64],
            content_date=day,
            content_time=time,
            series_date=day,
            series_time=time,
            coding_schemes=coding_schemes or None,
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise OutputError(f"structured report: {e}") from e
