"""Turn a scored series into DICOM result objects (SR, heat-map SC) stored for delivery.

UIDs come from ``uid_key`` = series UID + generation + weights hash, so a retried job rebuilds
byte-for-byte the same identities and the PACS never sees a second report for one run; a re-run
after late slices is a new generation and its SR references the one it supersedes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from triage_agent.config import AgentConfig, HL7DestinationConfig
from triage_agent.operating_point import OperatingPoint
from triage_agent.storage import Storage, uid_hash

log = logging.getLogger(__name__)


@dataclass
class BuiltOutput:
    kind: str  # "sr" | "sc"
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    relpath: str
    destination: str | None = None  # set for per-destination objects (HL7 messages)


def priority_for(score: float | None, cfg: AgentConfig, threshold: float) -> str:
    """Worklist priority of a series scored at ``threshold`` (``OperatingPoint.priority``)."""
    return OperatingPoint(threshold, tuple(cfg.triage.priority_bands)).priority(score)


def top_slices(slices: Sequence[tuple[str | None, float]], k: int) -> list[int]:
    """Indices of the k highest-scoring slices that have a source SOP Instance UID."""
    order = sorted((i for i, (uid, _) in enumerate(slices) if uid), key=lambda i: -slices[i][1])
    return order[:k]


def _build_hl7(dest: HL7DestinationConfig, storage: Storage, header: Dataset, result: Any,
               model: Any, priority: str, *, sr_uid: str,
               observed_at: datetime | None) -> BuiltOutput:
    """One ORU^R01 per result and RIS (MSH names the receiver); the control id is fixed by the
    SR UID, so a retry resends the same message and the RIS can recognise it."""
    from triage_agent.hl7 import HL7Destination, ResultNotice, build_oru, control_id_for

    control_id = control_id_for(sr_uid)
    notice = ResultNotice(
        message_control_id=control_id,
        patient_id=str(header.get("PatientID", "")) or None,
        patient_name=str(header.get("PatientName", "")) or None,
        accession_number=str(header.get("AccessionNumber", "")) or None,
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=str(header.SeriesInstanceUID),
        verdict=result.verdict, score=result.score, threshold=result.threshold,
        priority=priority, model_name=model.name, model_version=model.version,
        observed_at=observed_at or datetime.utcnow(),
    )
    message = build_oru(notice, HL7Destination(**dest.model_dump()))
    key = f"{control_id}-{uid_hash(dest.name)[:8]}"
    rel = f"outputs/{key}.hl7"
    storage.write_atomic(rel, [message])
    return BuiltOutput("hl7", "HL7v2-ORU^R01", key, str(header.SeriesInstanceUID), rel,
                       destination=dest.name)


def _source_of(sc: Dataset) -> tuple[str, int | None]:
    """(SOP Instance UID, frame number or None) of the image a heat map was made from."""
    item = sc.SourceImageSequence[0]
    frame = item.get("ReferencedFrameNumber")
    return str(item.ReferencedSOPInstanceUID), None if frame is None else int(frame)


def build_outputs(
    *,
    cfg: AgentConfig,
    storage: Storage,
    source_paths: Sequence[Path],
    result: Any,  # triage_agent.inference.SeriesResult
    model: Any,  # name, version, weights_sha256
    uid_key: str,
    supersedes_path: Path | None,
    priority: str,
    content_datetime: datetime | None = None,
) -> list[BuiltOutput]:
    """Build, write (atomically) and describe the SR and, where wanted, the heat-map series.

    ``content_datetime`` should be fixed per generation (the series' completion time) so that a
    retried job writes byte-identical objects, not just the same UIDs.
    """
    from triage_agent.outputs.common import AlgorithmInfo, TriageFinding
    from triage_agent.outputs.sc import build_sc_series, grid_orientation
    from triage_agent.outputs.sr import build_sr

    out_cfg = cfg.outputs
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]
    idx = top_slices(result.slices, out_cfg.top_k_slices)
    finding = TriageFinding(
        verdict=result.verdict,
        score=result.score,
        threshold=result.threshold,
        priority=priority,
        reason=result.reason,
        top_slices=[(str(result.slices[i][0]), float(result.slices[i][1])) for i in idx],
        # frame numbers when the series is one multi-frame (enhanced CT) image
        top_frames=[frames[i] for i in idx] if (frames := getattr(result, "frames", None)) else [],
    )
    algorithm = AlgorithmInfo(name=model.name, version=model.version,
                              weights_sha256=model.weights_sha256,
                              manufacturer=out_cfg.manufacturer)
    supersedes = pydicom.dcmread(supersedes_path) if supersedes_path else None
    built: list[tuple[str, Dataset]] = [(
        "sr",
        build_sr(headers, finding, algorithm, uid_key=uid_key,
                 series_description=out_cfg.sr_series_description, supersedes=supersedes,
                 content_datetime=content_datetime),
    )]
    want_sc = result.verdict == "abnormal" or (result.verdict == "normal" and out_cfg.sc_for_normal)
    if want_sc and idx and result.model_input is not None and result.heatmaps is not None:
        images = np.asarray(result.model_input.x)[idx]
        heat = np.asarray(result.heatmaps)[idx]
        scs = build_sc_series(headers, finding, algorithm, images, heat, uid_key=uid_key,
                              series_description=out_cfg.sc_series_description,
                              overlay=out_cfg.overlay, opacity=out_cfg.overlay_opacity,
                              colormap=out_cfg.colormap,
                              pixel_spacing_mm=getattr(result.model_input, "pixel_mm", None)
                              or None,
                              orientation=grid_orientation(
                                  float(getattr(result.model_input, "yaw_rad", 0.0) or 0.0)),
                              content_datetime=content_datetime)
        # anatomical order (as numbered), but the most suspicious stored first: the status
        # page's thumbnail of a series is its first heat map
        top = (finding.top_slices[0][0], finding.top_frames[0] if finding.top_frames else None)
        scs.sort(key=lambda sc: _source_of(sc) != top)
        built += [("sc", sc) for sc in scs]
    outputs = []
    for dest in cfg.hl7_destinations:
        outputs.append(_build_hl7(dest, storage, headers[0], result, model, priority,
                                  sr_uid=str(built[0][1].SOPInstanceUID),
                                  observed_at=content_datetime))
    for kind, ds in built:
        rel = f"outputs/{uid_hash(str(ds.SOPInstanceUID))[:32]}.dcm"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        storage.write_atomic(rel, [buf.getvalue()])
        outputs.append(BuiltOutput(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                   str(ds.SeriesInstanceUID), rel))
    return outputs
