"""Normal series from the PACS for site onboarding (``triage-agent onboard --from-pacs``).

A CSV lists one study per line, by StudyInstanceUID (dotted digits) or AccessionNumber (anything
else); a header line and further columns are ignored. For each study the configured PACS
(``[onboarding] pacs``, else the first ``[[destinations]]`` entry) is asked with C-FIND (Study
Root) for the study's series; series whose modality or description the node's selection rules
refuse are not fetched, the others are retrieved with C-GET into one folder per series
(``OUT_DIR/<SeriesInstanceUID>/``) and checked against the full rules (orientation, slice
thickness, slice count). A study that cannot be found or fetched is reported and the others go
on. Output names lines of the CSV and shortened UIDs, never patient identifiers or accession
numbers.

C-GET needs no route back to this machine: the PACS answers on the same association, so it only
has to allow C-GET for the node's AE title (Orthanc: ``DicomAlwaysAllowGet`` or a
``DicomModalities`` entry; others: add the AE as a query/retrieve peer). C-MOVE is not used: it
would send the images to the node's own port, into the running triage.
"""

from __future__ import annotations

import csv
import shutil
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from triage_agent import pynetdicom_compat
from triage_agent.config import AgentConfig, DestinationConfig
from triage_agent.dicom_uids import IMAGE_SOP_CLASSES, valid_uid
from triage_agent.ingest import short_id
from triage_agent.selection import SeriesFacts, select_series, skip_reason
from triage_agent.sender import build_scu_ssl
from triage_agent.transfer_syntax import ACCEPTED_TRANSFER_SYNTAXES

HEADER_WORDS = {"studyinstanceuid", "study_instance_uid", "accessionnumber", "accession_number",
                "accession", "uid", "study"}
PENDING = (0xFF00, 0xFF01)

# C-FIND answers carry patient names and IDs: keep them out of pynetdicom's own log.
pynetdicom_compat.hide_identifiers_in_logs()


class RetrieveError(Exception):
    """Nothing can be retrieved (no PACS configured, unreachable, refused); says what to fix."""


@dataclass(frozen=True)
class StudyRef:
    line: int  # line of the CSV, for messages
    kind: str  # "uid" | "accession"
    value: str

    @property
    def label(self) -> str:
        """How messages name the study: its line and, for a UID, a shortened UID."""
        if self.kind == "uid":
            return f"line {self.line} (study {short_id(self.value)})"
        return f"line {self.line} (accession number)"


def read_studies(path: Path) -> list[StudyRef]:
    """The studies listed in ``path``: first column, blank and ``#`` lines skipped, an optional
    header line recognised by its name."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise RetrieveError(f"{path}: cannot read the study list: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise RetrieveError(f"{path}: the study list is not UTF-8 text") from e
    refs: list[StudyRef] = []
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        value = (row[0] if row else "").strip().strip('"').strip()
        if not value or value.startswith("#"):
            continue
        if not refs and value.replace(" ", "").lower() in HEADER_WORDS:
            continue
        kind = "uid" if valid_uid(value) and "." in value else "accession"
        if kind == "accession" and len(value) > 16:
            raise RetrieveError(f"{path}: line {n}: neither a StudyInstanceUID (dotted digits, at "
                                "most 64 characters) nor an AccessionNumber (at most 16 "
                                "characters)")
        refs.append(StudyRef(n, kind, value))
    if not refs:
        raise RetrieveError(f"{path}: no StudyInstanceUID or AccessionNumber in the file")
    return refs


def pacs_for(cfg: AgentConfig) -> DestinationConfig:
    """The PACS to retrieve from: ``[onboarding] pacs`` by name, else the first destination."""
    if not cfg.destinations:
        raise RetrieveError("no PACS configured: add it as a [[destinations]] entry in agent.toml "
                            "(name, ae_title, host, port)")
    name = cfg.onboarding.pacs
    if not name:
        return cfg.destinations[0]
    for d in cfg.destinations:
        if d.name == name:
            return d
    names = ", ".join(repr(d.name) for d in cfg.destinations if d.name) or "none named"
    raise RetrieveError(f"[onboarding] pacs = {name!r} names no [[destinations]] entry "
                        f"(configured: {names})")


class _Pacs:
    """One association to the PACS with Study Root C-FIND and C-GET (we take the storage SCP
    role for CT images on it)."""

    def __init__(self, cfg: AgentConfig, dest: DestinationConfig) -> None:
        self.cfg, self.dest = cfg, dest
        self.ae = AE(ae_title=cfg.node.ae_title)
        self.ae.acse_timeout = cfg.delivery.timeout_s
        self.ae.dimse_timeout = cfg.delivery.timeout_s
        self.ae.network_timeout = cfg.delivery.timeout_s
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in IMAGE_SOP_CLASSES:
            self.ae.add_requested_context(uid, list(ACCEPTED_TRANSFER_SYNTAXES))
        self.roles: list[Any] = [build_role(uid, scp_role=True) for uid in IMAGE_SOP_CLASSES]
        self.folder: Path | None = None
        self.received = 0
        self.bar: Any = None

    @contextmanager
    def association(self) -> Iterator[Any]:
        d = self.dest
        ctx = build_scu_ssl(d)
        tls_args = (ctx, d.host) if ctx is not None else None
        where = f"{d.ae_title}@{d.host}:{d.port}"
        try:
            assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title, ext_neg=self.roles,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)],
                                      tls_args=tls_args)
        except (OSError, ssl.SSLError) as e:
            raise RetrieveError(f"cannot reach the PACS {where}: {e.__class__.__name__}") from e
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "did not answer"
            raise RetrieveError(f"the PACS {where} {why}; check its AE title, host and port, and "
                                f"that it accepts the calling AE {self.cfg.node.ae_title!r}")
        pynetdicom_compat.prepare_requestor(assoc)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, event: Any) -> int:
        """A C-STORE sub-operation of our C-GET: write the instance into the current folder."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if self.folder is None or not valid_uid(uid):
            return 0xC211  # refused: not ours, or a UID unfit for a file name
        tmp = self.folder / f".{uid}.part"
        with open(tmp, "wb") as f:
            f.write(event.encoded_dataset())
        tmp.replace(self.folder / f"{uid}.dcm")
        self.received += 1
        if self.bar is not None:
            self.bar.update(1)
        return 0x0000

    def find(self, assoc: Any, level: str, **keys: str) -> list[Dataset]:
        """C-FIND (Study Root) at ``level``; ``keys`` are matched ("" = return this key)."""
        q = Dataset()
        q.QueryRetrieveLevel = level
        for k, v in keys.items():
            setattr(q, k, v)
        out: list[Dataset] = []
        for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
            code = int(getattr(status, "Status", -1))
            if code in PENDING and ident is not None:
                out.append(ident)
            elif code not in PENDING and code != 0x0000:
                raise _StudyError((f"the PACS answered C-FIND with status 0x{code:04X}"
                                   if code >= 0 else "the PACS did not answer the C-FIND")
                                  + self.permission_hint("C-FIND"))
        return out

    def get_series(self, assoc: Any, study_uid: str, series_uid: str, folder: Path) -> int:
        """C-GET one series into ``folder``; the number of instances received."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        self.folder, self.received = folder, 0
        last = -1
        try:
            for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                last = int(getattr(status, "Status", -1))
        finally:
            self.folder = None
        if last not in (0x0000, 0xB000) and not self.received:
            raise _StudyError((f"C-GET failed with status 0x{last:04X}" if last >= 0
                               else "the PACS did not answer the C-GET")
                              + self.permission_hint("C-GET"))
        return self.received

    def permission_hint(self, what: str) -> str:
        return (f"; does the PACS allow {what} for the AE title {self.cfg.node.ae_title!r}? "
                "(Orthanc: a DicomModalities entry with AllowFind and AllowGet)")


class _StudyError(Exception):
    """One study cannot be found or fetched; reported, the other studies go on."""


def _prefilter_rules(cfg: AgentConfig) -> Any:
    """The selection rules that C-FIND answers are enough for (modality, description)."""
    return cfg.series.model_copy(update={"body_parts": [], "axial_only": False, "min_slices": 1})


def _series_uids(pacs: _Pacs, assoc: Any, ref: StudyRef) -> list[tuple[str, Dataset]]:
    """(StudyInstanceUID, series C-FIND answer) of every series of the study ``ref`` names."""
    if ref.kind == "uid":
        study_uids = [ref.value]
    else:
        found = pacs.find(assoc, "STUDY", AccessionNumber=ref.value, StudyInstanceUID="")
        study_uids = sorted({str(d.get("StudyInstanceUID", "")) for d in found} - {""})
        if not study_uids:
            raise _StudyError("no study with this accession number on the PACS")
    out = []
    for uid in study_uids:
        for d in pacs.find(assoc, "SERIES", StudyInstanceUID=uid, SeriesInstanceUID="",
                           Modality="", SeriesDescription="", SeriesNumber="",
                           NumberOfSeriesRelatedInstances=""):
            if valid_uid(str(d.get("SeriesInstanceUID", ""))):
                out.append((uid, d))
    if not out:
        raise _StudyError("study not found on the PACS" if ref.kind == "uid"
                          else "the study has no series on the PACS")
    return out


def retrieve_normals(cfg: AgentConfig, studies_csv: Path, out_dir: Path,
                     progress: bool = True) -> list[Path]:
    """Retrieve the studies listed in ``studies_csv`` from the PACS into one folder per series
    under ``out_dir``; return the folders of the series the node's selection rules accept.

    Every skipped series is printed with its reason and every study that cannot be found or
    fetched with the cause (stdout); a PACS that cannot be used at all raises RetrieveError."""
    refs = read_studies(Path(studies_csv))
    dest = pacs_for(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pacs = _Pacs(cfg, dest)
    pre_rules = _prefilter_rules(cfg)
    kept: list[Path] = []
    failed = 0
    for i, ref in enumerate(refs, 1):
        try:
            with pacs.association() as assoc:
                series = _series_uids(pacs, assoc, ref)
                for study_uid, d in series:
                    series_uid = str(d.SeriesInstanceUID)
                    modality = str(d.get("Modality", "") or "") or None
                    facts = SeriesFacts(modality, None,
                                        str(d.get("SeriesDescription", "") or "") or None,
                                        1, None, None)
                    # a PACS that does not return the modality: the files will tell
                    reason = skip_reason(facts, pre_rules if modality else pre_rules.model_copy(
                        update={"modalities": []}))
                    if reason is not None:
                        _say(f"skipped series {short_id(series_uid)} of {ref.label}: {reason}")
                        continue
                    folder = out_dir / series_uid
                    folder.mkdir(exist_ok=True)
                    total = _int(d.get("NumberOfSeriesRelatedInstances"))
                    with _bar(progress, total, f"study {i}/{len(refs)}") as pacs.bar:
                        n = pacs.get_series(assoc, study_uid, series_uid, folder)
                    pacs.bar = None
                    files = sorted(folder.glob("*.dcm"))
                    if not n and not files:
                        _say(f"skipped series {short_id(series_uid)} of {ref.label}: "
                             "the PACS sent no instances")
                        shutil.rmtree(folder, ignore_errors=True)
                        continue
                    ok, skipped = select_series({series_uid: files}, cfg.series)
                    if ok:
                        kept.append(folder)
                    for s in skipped:
                        _say(f"skipped series {s.series} of {ref.label}: {s.reason}")
                        shutil.rmtree(folder, ignore_errors=True)
        except _StudyError as e:
            failed += 1
            _say(f"error: {ref.label}: {e}", sys.stderr)
    _say(f"{len(kept)} series from {len(refs) - failed} of {len(refs)} studies retrieved into "
         f"{out_dir} and accepted by the selection rules")
    return sorted(kept)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _say(line: str, stream: TextIO | None = None) -> None:
    print(line, file=stream or sys.stdout, flush=True)


@contextmanager
def _bar(enabled: bool, total: int | None, desc: str) -> Iterator[Any]:
    """A tqdm bar of instances received (stderr), or nothing without tqdm or when disabled."""
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="image", file=sys.stderr, dynamic_ncols=True,
               leave=False)
    try:
        yield bar
    finally:
        bar.close()
