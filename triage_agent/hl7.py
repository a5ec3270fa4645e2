"""HL7 v2 result notifier: one ORU^R01 per triage result, sent over MLLP with the ACK checked.

The RIS learns the verdict, score and priority of each study without reading the DICOM SR. This
module only builds and sends one message; the retry / dead-letter bookkeeping is the same as for
DICOM deliveries (``triage_agent.sender``), so :func:`send_mllp` answers with the same
:class:`~triage_agent.delivery.SendOutcome` (``status`` is always ``None``: HL7 has no DICOM status).

Retries are recognisable: :func:`build_oru` is a pure function of the notice and the destination
(MSH-7 is the observation time, not "now"; MSH-10 comes from the notice), so a resent message is
byte-identical and carries the same control id. Derive the id with :func:`control_id_for` from
something fixed per result, such as the SR SOP Instance UID.

Message layout (HL7 v2.5.1, ORU^R01^ORU_R01, original acknowledgement mode)::

    MSH  -3/-4 sending app/facility, -5/-6 receiving, -7 observed_at, -10 control id, -11 P,
         -12 2.5.1, -18 UNICODE UTF-8
    PID  -3 patient id, -5 patient name (DICOM PN components mapped onto XPN)  [if the id is known]
    OBR  -2/-3 accession (placer/filler order number), -4 CT head (SCT 303653007), -7 and -22
         observed_at, -18 accession (IHE radiology), -24 CT, -25 F, -27.6 priority (backward
         compatible TQ)
    TQ1  -9 priority (HL7 table 0485: S / A / R)                         [for known band names]
    OBX  1 CWE verdict (SCT code + product code), OBX-8 A / N
    OBX  2 NM  score, OBX-7 reference range "<threshold", OBX-8 H / N    (OBX-11 X if no score)
    OBX  3 CWE priority band (SCT code, or 99TRIAGE for site-specific names)
    OBX  4 ST  Study Instance UID (DCM 110180)
    OBX  5 ST  Series Instance UID (DCM 112002)
    OBX  6 ST  algorithm name (DCM 111001)
    OBX  7 ST  algorithm version (DCM 111003)

The codes are the ones the DICOM SR uses (``triage_agent.outputs.sr``), so both documents say the
same thing in the same vocabulary. Free text is escaped (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``);
control characters become spaces.

Error strings never contain patient data: they name the destination, the control id (a hash), the
acknowledgement code and, at most, an HL7 table 0357 error code. Free text sent back by the RIS
(MSA-3, ERR-8, ...) is deliberately not copied, because a RIS may echo the patient's name in it.
"""

from __future__ import annotations

import hashlib
import math
import re
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from triage_agent.delivery import DELIVERED, PERMANENT, TRANSIENT, SendOutcome
from triage_agent.outputs.sr import (
    PRIORITY,
    PRIVATE_SCHEME,
    PROCEDURE_CT_HEAD,
    SCORE,
    VERDICT,
    VERDICT_CODES,
    priority_code,
)

__all__ = [
    "HL7Destination",
    "ResultNotice",
    "HL7_VERSION",
    "build_oru",
    "control_id_for",
    "escape",
    "frame",
    "send_mllp",
]

HL7_VERSION = "2.5.1"
START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
MAX_ACK_BYTES = 1 << 20
CONTROL_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,20}$")  # MSH-10 is ST, at most 20 characters

VERDICTS = ("abnormal", "normal", "not_assessable")
VERDICT_TEXT = {"abnormal": "Abnormal", "normal": "Normal", "not_assessable": "Not assessable"}
VERDICT_FLAG = {"abnormal": "A", "normal": "N", "not_assessable": ""}  # OBX-8, HL7 table 0078

#: Band name -> HL7 table 0485 / 0027 priority (S stat, A ASAP, R routine); others: no TQ1.
TQ_PRIORITY = {
    "stat": "S", "immediate": "S", "emergency": "S", "urgent": "S",
    "high": "A",
    "normal": "R", "routine": "R", "low": "R",
}
TQ_PRIORITY_TEXT = {"S": "Stat", "A": "ASAP", "R": "Routine"}

#: (code, meaning, scheme) for the OBX-3 observation identifiers without an SR constant.
STUDY_UID = ("110180", "Study Instance UID", "DCM")
SERIES_UID = ("112002", "Series Instance UID", "DCM")
ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")

#: HL7 table 0357 (message error condition codes): the only RIS-supplied values we repeat.
ERROR_CODES = {"0", "100", "101", "102", "103", "200", "201", "202", "203", "204", "205", "206",
               "207"}

ACK_KINDS = {
    "AA": (DELIVERED, "application accept"),
    "CA": (DELIVERED, "commit accept"),
    "AE": (TRANSIENT, "application error"),
    "CE": (TRANSIENT, "commit error"),
    "AR": (PERMANENT, "application reject"),
    "CR": (PERMANENT, "commit reject"),
}


@dataclass(frozen=True)
class HL7Destination:
    """One RIS (``[[hl7_destinations]]`` in ``agent.toml``). Application and facility names are
    HD namespace ids, written escaped as one component."""

    name: str
    host: str
    port: int
    sending_application: str = "TRIAGE_AGENT"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ResultNotice:
    """What the RIS is told about one result (DICOM-free)."""

    message_control_id: str  # MSH-10, fixed per result: see control_id_for()
    patient_id: str | None
    patient_name: str | None  # DICOM PN form: Family^Given^Middle^Prefix^Suffix
    accession_number: str | None
    study_instance_uid: str
    series_instance_uid: str
    verdict: str  # abnormal | normal | not_assessable
    score: float | None  # None when not assessable
    threshold: float  # abnormal when score >= threshold
    priority: str  # urgent | high | routine | a site's band name
    model_name: str
    model_version: str
    observed_at: datetime  # naive = UTC


# --------------------------------------------------------------------------------------------
# building


def control_id_for(*parts: str) -> str:
    """A 20-character MSH-10 derived from ``parts`` (e.g. the SR SOP Instance UID): the same
    result always gets the same id, and UIDs (up to 64 characters) do not fit MSH-10."""
    if not parts:
        raise ValueError("control_id_for needs at least one part")
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()
    return digest[:20].upper()


def escape(text: str) -> str:
    """Escape HL7 delimiters in free text (default encoding characters ``|^~\\&``).

    The escape character goes first so that the sequences added afterwards stay intact. Control
    characters (CR would end the segment, \\x0b / \\x1c would break MLLP framing) become spaces.
    """
    out = text.replace("\\", "\\E\\")
    out = out.replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("&", "\\T\\").replace("~", "\\R\\")
    return "".join(" " if (ord(c) < 0x20 or ord(c) == 0x7F) else c for c in out)


def _dtm(value: datetime) -> str:
    """HL7 DTM in UTC with explicit offset; a naive datetime is taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y%m%d%H%M%S") + "+0000"


def _nm(value: float) -> str:
    """HL7 NM: plain decimal (no exponent), shortest text that reads back as the same float."""
    if not math.isfinite(value):
        raise ValueError("HL7 NM values must be finite")
    text = format(Decimal(repr(float(value))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _ce(code: str, meaning: str, scheme: str) -> str:
    return "^".join((escape(code), escape(meaning), escape(scheme)))


def _xpn(name: str) -> str:
    """DICOM PN (first, alphabetic group) -> XPN. DICOM orders family, given, middle, prefix,
    suffix; XPN is family, given, further given, suffix, prefix."""
    comps = name.split("=", 1)[0].split("^")[:5]
    comps += [""] * (5 - len(comps))
    family, given, middle, prefix, suffix = (c.strip() for c in comps)
    return "^".join(escape(c) for c in (family, given, middle, suffix, prefix)).rstrip("^")


def _check(notice: ResultNotice) -> None:
    if not CONTROL_ID_RE.match(notice.message_control_id):
        raise ValueError("message_control_id must be 1-20 characters [A-Za-z0-9._-] "
                         "(use control_id_for())")
    if notice.verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
    if notice.verdict != "not_assessable" and notice.score is None:
        raise ValueError("an abnormal/normal verdict needs a score")
    if not math.isfinite(notice.threshold) or (
        notice.score is not None and not math.isfinite(notice.score)
    ):
        raise ValueError("score and threshold must be finite")


def build_oru(notice: ResultNotice, dest: HL7Destination) -> bytes:
    """The ORU^R01 (HL7 v2.5.1, ER7, UTF-8, segments separated by CR) for one result."""
    _check(notice)
    when = _dtm(notice.observed_at)
    msg = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    _fill_msh(msg.msh, notice, dest, when)
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    if notice.patient_id and notice.patient_id.strip():  # PID-3 is required: no id, no PID
        _fill_pid(result.add_group("ORU_R01_PATIENT").pid, notice)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _fill_order(order, notice, when)
    for i, row in enumerate(_observations(notice), start=1):
        _fill_obx(order.add_group("ORU_R01_OBSERVATION").obx, i, row, notice, when)
    return (msg.to_er7() + "\r").encode("utf-8")  # every segment ends with CR, the last too


def _fill_msh(msh: Any, notice: ResultNotice, dest: HL7Destination, when: str) -> None:
    """MSH: sender and receiver, observation time, message type, control id, version."""
    msh.msh_3 = escape(dest.sending_application)
    if dest.sending_facility:
        msh.msh_4 = escape(dest.sending_facility)
    if dest.receiving_application:
        msh.msh_5 = escape(dest.receiving_application)
    if dest.receiving_facility:
        msh.msh_6 = escape(dest.receiving_facility)
    msh.msh_7 = when
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = notice.message_control_id
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = "UNICODE UTF-8"


def _fill_pid(pid: Any, notice: ResultNotice) -> None:
    """PID: patient id and, when known, name."""
    pid.pid_1 = "1"
    pid.pid_3 = escape((notice.patient_id or "").strip())
    if notice.patient_name:
        pid.pid_5 = _xpn(notice.patient_name)


def _fill_order(order: Any, notice: ResultNotice, when: str) -> None:
    """OBR (accession, CT head, times, priority) and, for known band names, TQ1."""
    obr = order.obr
    obr.obr_1 = "1"
    tq = TQ_PRIORITY.get(notice.priority.strip().lower())
    if notice.accession_number:
        accession = escape(notice.accession_number.strip())
        obr.obr_2 = accession
        obr.obr_3 = accession
        obr.obr_18 = accession
    obr.obr_4 = _ce(PROCEDURE_CT_HEAD.value, PROCEDURE_CT_HEAD.meaning,
                    PROCEDURE_CT_HEAD.scheme_designator)
    obr.obr_7 = when
    obr.obr_22 = when
    obr.obr_24 = "CT"
    obr.obr_25 = "F"
    if tq:
        obr.obr_27 = f"^^^^^{tq}"  # TQ.6 priority (table 0027), for pre-2.5 receivers
        tq1 = order.add_group("ORU_R01_TIMING_QTY").tq1
        tq1.tq1_1 = "1"
        tq1.tq1_9 = f"{tq}^{TQ_PRIORITY_TEXT[tq]}^HL70485"


#: One OBX: (value type, OBX-3, OBX-5, OBX-7 reference range, OBX-8 flag, OBX-11 status).
_Observation = tuple[str, str, str, str, str, str]


def _observations(notice: ResultNotice) -> list[_Observation]:
    """The seven OBX rows: verdict, score, priority, study and series UID, algorithm."""
    verdict = VERDICT_CODES[notice.verdict]
    verdict_value = "^".join((
        _ce(verdict.value, verdict.meaning, verdict.scheme_designator),
        _ce(notice.verdict.upper(), VERDICT_TEXT[notice.verdict], PRIVATE_SCHEME),
    ))
    band = priority_code(notice.priority)
    priority_value = _ce(band.value, band.meaning, band.scheme_designator)
    if band.scheme_designator != PRIVATE_SCHEME:  # add the site's band name as the alternate
        local = "".join(c if c.isalnum() else "_" for c in notice.priority.strip().upper())
        priority_value += "^" + _ce(local[:16], notice.priority.strip()[:64], PRIVATE_SCHEME)

    if notice.score is None:
        score_value, score_flag, score_status = "", "", "X"  # X: result cannot be obtained
    else:
        # the verdict was decided once, by the operating point: the flag follows it
        high = notice.verdict == "abnormal"
        score_value, score_flag, score_status = _nm(notice.score), ("H" if high else "N"), "F"

    return [
        ("CWE", _ce(VERDICT.value, VERDICT.meaning, VERDICT.scheme_designator), verdict_value,
         "", VERDICT_FLAG[notice.verdict], "F"),
        ("NM", _ce(SCORE.value, SCORE.meaning, SCORE.scheme_designator), score_value,
         "<" + _nm(notice.threshold), score_flag, score_status),
        ("CWE", _ce(PRIORITY.value, PRIORITY.meaning, PRIORITY.scheme_designator),
         priority_value, "", "", "F"),
        ("ST", _ce(*STUDY_UID), escape(notice.study_instance_uid), "", "", "F"),
        ("ST", _ce(*SERIES_UID), escape(notice.series_instance_uid), "", "", "F"),
        ("ST", _ce(*ALGORITHM_NAME), escape(notice.model_name), "", "", "F"),
        ("ST", _ce(*ALGORITHM_VERSION), escape(notice.model_version), "", "", "F"),
    ]


def _fill_obx(obx: Any, index: int, row: _Observation, notice: ResultNotice, when: str) -> None:
    """OBX ``index``: one observation row, with units on the score and the observation time."""
    vtype, ident, value, ref, flag, status = row
    obx.obx_1 = str(index)
    obx.obx_2 = vtype
    obx.obx_3 = ident
    if value:
        obx.obx_5 = value
    if notice.score is not None and vtype == "NM":
        obx.obx_6 = "{score}^score^UCUM"
    if ref:
        obx.obx_7 = ref
    if flag:
        obx.obx_8 = flag
    obx.obx_11 = status
    obx.obx_14 = when


# --------------------------------------------------------------------------------------------
# sending


def frame(message: bytes) -> bytes:
    """MLLP block: <VT> message <FS><CR>."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


def _control_id_of(message: bytes) -> str | None:
    """MSH-10 of an outgoing ER7 message (the separator is read from MSH itself)."""
    head = message.split(b"\r", 1)[0].decode("utf-8", "replace")
    if not head.startswith("MSH") or len(head) < 4:
        return None
    fields = head.split(head[3])
    return fields[9].strip() if len(fields) > 9 else None


def _read_ack(sock: socket.socket, deadline: float) -> bytes:
    """Bytes up to and including <FS><CR>, or what came before the peer closed (maybe nothing).
    Raises TimeoutError when the deadline passes, ValueError when the reply is over
    MAX_ACK_BYTES."""
    buf = b""
    while END_BLOCK + CARRIAGE_RETURN not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_ACK_BYTES:
            raise ValueError("reply too long")
    return buf


def _parse_ack(block: bytes) -> tuple[str, str, str | None] | None:
    """(MSA-1, MSA-2, ERR-3.1 or MSA-6.1 if it is a table 0357 code) from one MLLP block, or
    None when the block is not an HL7 acknowledgement."""
    start = block.find(START_BLOCK)
    end = block.find(END_BLOCK + CARRIAGE_RETURN)
    if start < 0 or end < start or block[:start].strip():
        return None
    text = block[start + 1:end].decode("utf-8", "replace")
    segments = [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        return None
    fsep, csep = segments[0][3], segments[0][4]
    msa: list[str] | None = None
    code: str | None = None
    for seg in segments[1:]:
        fields = seg.split(fsep)
        if fields[0] == "MSA" and msa is None:
            msa = fields
            if len(fields) > 6:  # MSA-6 error condition (deprecated in 2.5, still sent)
                code = fields[6].split(csep)[0].strip() or None
        elif fields[0] == "ERR" and len(fields) > 3 and code is None:
            code = fields[3].split(csep)[0].strip() or None
    if msa is None or len(msa) < 3:
        return None
    return msa[1].strip().upper(), msa[2].strip(), code if code in ERROR_CODES else None


def send_mllp(dest: HL7Destination, message: bytes) -> SendOutcome:
    """Send one message on its own connection and check the acknowledgement.

    AA / CA -> DELIVERED; AE / CE -> TRANSIENT (the RIS may recover); AR / CR -> PERMANENT;
    an ACK for another control id, no ACK, a garbled ACK, refusal or timeout -> TRANSIENT.
    ``dest.timeout_s`` bounds the connect and, separately, the wait for the whole ACK.
    """
    where = f"HL7 {dest.name} ({dest.host}:{dest.port})"
    control_id = _control_id_of(message)
    if control_id is None:
        return SendOutcome(PERMANENT, None, f"{where}: not an ER7 message (no MSH-10)")
    if START_BLOCK in message or END_BLOCK in message:
        return SendOutcome(PERMANENT, None, f"{where}: message {control_id} contains MLLP "
                                            "framing bytes")
    try:
        sock = socket.create_connection((dest.host, dest.port), timeout=dest.timeout_s)
    except TimeoutError:
        return SendOutcome(TRANSIENT, None, f"{where}: connect timed out after "
                                            f"{dest.timeout_s:g} s")
    except OSError as e:
        return SendOutcome(TRANSIENT, None, f"{where}: cannot connect: "
                                            f"{e.strerror or e.__class__.__name__}")
    try:
        with sock:
            sock.sendall(frame(message))
            reply = _read_ack(sock, time.monotonic() + dest.timeout_s)
    except TimeoutError:
        return SendOutcome(TRANSIENT, None, f"{where}: no ACK for {control_id} within "
                                            f"{dest.timeout_s:g} s")
    except ValueError:
        return SendOutcome(TRANSIENT, None, f"{where}: garbled ACK for {control_id} "
                                            f"(over {MAX_ACK_BYTES} bytes without an end block)")
    except OSError as e:
        return SendOutcome(TRANSIENT, None, f"{where}: connection lost sending {control_id}: "
                                            f"{e.strerror or e.__class__.__name__}")
    if not reply:
        return SendOutcome(TRANSIENT, None, f"{where}: connection closed before an ACK for "
                                            f"{control_id}")
    parsed = _parse_ack(reply)
    if parsed is None:
        return SendOutcome(TRANSIENT, None, f"{where}: garbled ACK for {control_id} "
                                            "(no MLLP-framed MSH/MSA)")
    ack_code, acked_id, err_code = parsed
    if acked_id != control_id:
        other = acked_id if CONTROL_ID_RE.match(acked_id) else "another message"
        return SendOutcome(TRANSIENT, None, f"{where}: ACK does not match: MSA-2 names "
                                            f"{other!r}, we sent {control_id}")
    if ack_code not in ACK_KINDS:
        return SendOutcome(TRANSIENT, None, f"{where}: garbled ACK for {control_id} "
                                            "(unknown MSA-1 acknowledgement code)")
    kind, meaning = ACK_KINDS[ack_code]
    if kind == DELIVERED:
        return SendOutcome(DELIVERED, None, None)
    detail = f", error code {err_code}" if err_code else ""
    # An AE/CE/AR/CR acknowledgement is an answer: the RIS is up, so the circuit breaker stays shut.
    return SendOutcome(kind, None, f"{where}: {ack_code} ({meaning}) for {control_id}{detail}",
                       answered=True)

