"""HL7 v2 notifier: the ORU^R01 read back with hl7apy, and MLLP delivery against hl7apy's
MLLPServer (a library listener on an ephemeral loopback port, not a hand-written socket)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from hl7apy.v2_5_1 import get_base_datatypes

from triage_agent.hl7 import (
    HL7Destination,
    ResultNotice,
    build_oru,
    control_id_for,
    escape,
    send_mllp,
)
from triage_agent.sender import DELIVERED, PERMANENT, TRANSIENT

CANARY_ID = "CANARYPID7731"
CANARY_FAMILY, CANARY_GIVEN = "CANARYFAMILY", "CANARYGIVEN"
ORU_TYPE = "ORU^R01^ORU_R01"


def notice(**changes: Any) -> ResultNotice:
    base = ResultNotice(
        message_control_id=control_id_for("1.2.826.0.1.3680043.10.543.1.2.3"),
        patient_id=CANARY_ID,
        patient_name=f"{CANARY_FAMILY}^{CANARY_GIVEN}",
        accession_number="ACC123",
        study_instance_uid="1.2.826.0.1.3680043.10.543.7",
        series_instance_uid="1.2.826.0.1.3680043.10.543.7.1",
        verdict="abnormal",
        score=0.8731,
        threshold=0.42,
        priority="urgent",
        model_name="ct-head-ssl",
        model_version="1.4.0",
        observed_at=dt.datetime(2026, 11, 26, 12, 30, 5),
    )
    return dataclasses.replace(base, **changes)


def dest(port: int, **changes: Any) -> HL7Destination:
    return dataclasses.replace(
        HL7Destination(name="ris", host="127.0.0.1", port=port, receiving_application="RIS",
                       receiving_facility="HOSP", timeout_s=2.0),
        **changes,
    )


def parse(er7: bytes | str) -> Message:
    text = er7.decode("utf-8") if isinstance(er7, bytes) else er7
    return parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)


def observations(msg: Message) -> dict[str, Any]:
    """OBX segments keyed by OBX-3.1."""
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    return {g.obx.obx_3.obx_3_1.value: g.obx for g in order.oru_r01_observation}


# --------------------------------------------------------------------------------------------
# message content


def test_oru_parses_back_and_carries_the_result() -> None:
    raw = build_oru(notice(), dest(2575))
    assert b"\n" not in raw and raw.count(b"\r") == 11 and raw.endswith(b"\r")  # 11 segments
    msg = parse(raw)
    assert msg.validate()  # hl7apy strict structure check of ORU_R01 v2.5.1

    msh = msg.msh
    assert msh.msh_9.to_er7() == ORU_TYPE
    assert msh.msh_10.value == notice().message_control_id and len(msh.msh_10.value) <= 20
    assert msh.msh_11.value == "P" and msh.msh_12.value == "2.5.1"
    assert msh.msh_3.to_er7() == "TRIAGE_AGENT" and msh.msh_5.to_er7() == "RIS"
    assert msh.msh_7.value == "20261126123005+0000"

    pid = msg.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == CANARY_ID
    assert pid.pid_5.xpn_1.to_er7() == CANARY_FAMILY and pid.pid_5.xpn_2.value == CANARY_GIVEN

    order = msg.oru_r01_patient_result.oru_r01_order_observation
    obr = order.obr
    assert obr.obr_2.to_er7() == obr.obr_3.to_er7() == "ACC123"
    assert obr.obr_4.to_er7() == "303653007^Computed tomography of head^SCT"
    assert obr.obr_7.value == "20261126123005+0000" and obr.obr_25.value == "F"
    assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "S^Stat^HL70485"

    obx = observations(msg)
    verdict = obx["365853002"]
    assert verdict.obx_2.value == "CWE"
    assert verdict.obx_5.to_er7().startswith("263654008^Abnormal^SCT^ABNORMAL^Abnormal")
    assert verdict.obx_8.value == "A" and verdict.obx_11.value == "F"
    score = obx["246262008"]
    assert score.obx_2.value == "NM" and float(score.obx_5.to_er7()) == 0.8731
    assert score.obx_7.value == "<0.42" and score.obx_8.value == "H"
    priority = obx["260870009"]
    assert priority.obx_2.value == "CWE" and "^Urgent^SCT" in priority.obx_5.to_er7()
    assert "urgent" in priority.obx_5.to_er7()
    assert obx["110180"].obx_5.to_er7() == "1.2.826.0.1.3680043.10.543.7"
    assert obx["112002"].obx_5.to_er7() == "1.2.826.0.1.3680043.10.543.7.1"
    assert obx["111001"].obx_5.to_er7() == "ct-head-ssl"
    assert obx["111003"].obx_5.to_er7() == "1.4.0"


@pytest.mark.parametrize(
    ("verdict", "score", "flag", "score_flag", "value"),
    [
        ("normal", 0.1, "N", "N", "17621005^Normal^SCT^NORMAL^Normal^99TRIAGE"),
        ("not_assessable", None, None, None,
         "82334004^Indeterminate^SCT^NOT_ASSESSABLE^Not assessable^99TRIAGE"),
    ],
)
def test_verdicts_and_flags(verdict: str, score: float | None, flag: str | None,
                            score_flag: str | None, value: str) -> None:
    msg = parse(build_oru(notice(verdict=verdict, score=score, priority="routine"), dest(1)))
    assert msg.validate()
    obx = observations(msg)
    assert obx["365853002"].obx_5.to_er7() == value
    assert (obx["365853002"].obx_8.to_er7() or None) == flag
    assert (obx["246262008"].obx_8.to_er7() or None) == score_flag
    if score is None:  # no number: "results cannot be obtained", but the range is still there
        assert obx["246262008"].obx_5.to_er7() == "" and obx["246262008"].obx_11.value == "X"
        assert obx["246262008"].obx_7.value == "<0.42"


def test_escaping_of_delimiters_in_free_text() -> None:
    text = "O|Brien\\&Co~X^Jane"
    expected = "O\\F\\Brien\\E\\\\T\\Co\\R\\X\\S\\Jane"
    assert escape(text) == expected
    # the library's own ST encoder agrees
    assert get_base_datatypes()["ST"](text).to_er7() == expected
    assert escape("a\rb\x0bc\x1cd") == "a b c d"  # nothing can end a segment or an MLLP block

    weird = notice(patient_name="O|Brien\\&Co~X^Jane", patient_id="ID|1^2",
                   accession_number="A&B~C", model_name="net|v^2")
    msg = parse(build_oru(weird, dest(1)))
    assert msg.validate()
    pid = msg.oru_r01_patient_result.oru_r01_patient.pid
    # DICOM PN components map onto XPN components; delimiters inside a component are escaped
    assert pid.pid_5.xpn_1.to_er7() == "O\\F\\Brien\\E\\\\T\\Co\\R\\X"
    assert pid.pid_5.xpn_2.to_er7() == "Jane"
    assert pid.pid_3.to_er7() == "ID\\F\\1\\S\\2"
    obr = msg.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_3.to_er7() == "A\\T\\B\\R\\C"
    assert observations(msg)["111001"].obx_5.to_er7() == "net\\F\\v\\S\\2"
    # nothing leaked into extra segments / fields
    assert len(msg.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation) == 7


def test_deterministic_and_missing_demographics() -> None:
    a, b = build_oru(notice(), dest(1)), build_oru(notice(), dest(1))
    assert a == b  # a retry is byte-identical, same MSH-10
    assert control_id_for("1.2.3") == control_id_for("1.2.3") != control_id_for("1.2.4")
    no_id = parse(build_oru(notice(patient_id=" "), dest(1)))  # PID-3 is required: no PID
    assert no_id.validate() and no_id.oru_r01_patient_result.oru_r01_patient.to_er7() == ""
    anon = parse(build_oru(notice(patient_id=None, patient_name=None, accession_number=None,
                                  priority="site-special"), dest(1)))
    assert anon.validate()
    assert anon.oru_r01_patient_result.oru_r01_patient.to_er7() == ""  # no PID at all
    obx = observations(anon)
    assert obx["260870009"].obx_5.to_er7() == "SITE_SPECIAL^site-special^99TRIAGE"


def test_rejects_bad_notices() -> None:
    with pytest.raises(ValueError, match="control_id"):
        build_oru(notice(message_control_id="1.2.826.0.1.3680043.10.543.1.2.3"), dest(1))
    with pytest.raises(ValueError, match="verdict"):
        build_oru(notice(verdict="maybe"), dest(1))
    with pytest.raises(ValueError, match="finite"):
        build_oru(notice(score=float("nan")), dest(1))


# --------------------------------------------------------------------------------------------
# delivery against hl7apy's MLLPServer


class Listener:
    """hl7apy MLLPServer in a thread; ``mode`` picks the reply, ``received`` keeps the ORUs."""

    def __init__(self) -> None:
        self.mode = "AA"
        self.received: list[str] = []
        self.release = threading.Event()  # lets a "never answers" handler finish at teardown
        self.server = MLLPServer("127.0.0.1", 0, {ORU_TYPE: (ReplyHandler, self)}, timeout=5)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def ack(self, incoming: str, code: str, control_id: str) -> str:
        oru = parse_message(incoming, validation_level=VALIDATION_LEVEL.TOLERANT)
        ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
        ack.msh.msh_3 = "RIS"
        ack.msh.msh_5 = oru.msh.msh_3.to_er7()
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = "ACK" + control_id[:17]
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = code
        ack.msa.msa_2 = control_id
        if code != "AA":  # a chatty RIS that echoes the patient back in its free text
            ack.msa.msa_3 = f"unknown patient {CANARY_FAMILY} {CANARY_ID}"
            ack.add_segment("ERR")
            ack.err.err_3 = "207^Application internal error^HL70357"
            ack.err.err_4 = "E"
            ack.err.err_8 = f"{CANARY_ID} {CANARY_FAMILY}^{CANARY_GIVEN}"
        return ack.to_mllp()


class ReplyHandler(AbstractHandler):
    def __init__(self, message: str, listener: Listener) -> None:
        super().__init__(message)
        self.listener = listener

    def reply(self) -> str:
        lst = self.listener
        lst.received.append(self.incoming_message)
        control_id = parse_message(self.incoming_message).msh.msh_10.value
        if lst.mode == "never":
            lst.release.wait(30)
            return ""
        if lst.mode == "garbage":
            return "this is not HL7\r\n"
        if lst.mode == "close":
            raise RuntimeError("handler failed: the server drops the connection")
        if lst.mode == "wrong_id":
            return lst.ack(self.incoming_message, "AA", "SOMEOTHERMESSAGE01")
        return lst.ack(self.incoming_message, lst.mode, control_id)


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    lst.thread.start()
    try:
        yield lst
    finally:
        lst.release.set()
        lst.server.shutdown()
        lst.server.server_close()
        lst.thread.join(5)


def assert_no_phi(error: str | None) -> None:
    assert error is None or "CANARY" not in error.upper(), error


def test_delivered_on_aa_and_the_listener_reads_the_oru(listener: Listener) -> None:
    n = notice()
    outcome = send_mllp(dest(listener.port), build_oru(n, dest(listener.port)))
    assert (outcome.kind, outcome.status, outcome.error) == (DELIVERED, None, None)
    assert len(listener.received) == 1
    got = parse(listener.received[0])  # what arrived over MLLP parses strictly
    assert got.msh.msh_10.value == n.message_control_id
    assert observations(got)["246262008"].obx_5.to_er7() == "0.8731"


@pytest.mark.parametrize(
    ("mode", "kind", "needle"),
    [
        ("CA", DELIVERED, None),
        ("AE", TRANSIENT, "AE (application error)"),
        ("CE", TRANSIENT, "CE (commit error)"),
        ("AR", PERMANENT, "AR (application reject)"),
        ("CR", PERMANENT, "CR (commit reject)"),
        ("wrong_id", TRANSIENT, "ACK does not match"),
        ("garbage", TRANSIENT, "garbled ACK"),
        ("close", TRANSIENT, "connection closed before an ACK"),
    ],
)
def test_ack_codes(listener: Listener, mode: str, kind: str, needle: str | None) -> None:
    listener.mode = mode
    outcome = send_mllp(dest(listener.port), build_oru(notice(), dest(listener.port)))
    assert outcome.kind == kind and outcome.status is None
    if needle is None:
        assert outcome.error is None
    else:
        assert outcome.error is not None and needle in outcome.error
        assert "ris (127.0.0.1:" in outcome.error
        assert_no_phi(outcome.error)
    if mode in ("AE", "AR"):
        assert outcome.error is not None and "error code 207" in outcome.error
    if mode == "wrong_id":
        assert outcome.error is not None and "SOMEOTHERMESSAGE01" in outcome.error
    # An acknowledgement, even a negative one, means the RIS is up: it must not count towards
    # opening the destination's circuit breaker; a closed connection does.
    if mode in ("AE", "CE", "AR", "CR"):
        assert not outcome.unanswered
    if mode == "close":
        assert outcome.unanswered


def test_nothing_listening_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    outcome = send_mllp(dest(port), build_oru(notice(), dest(port)))
    assert outcome.kind == TRANSIENT and "cannot connect" in (outcome.error or "")
    assert_no_phi(outcome.error)


def test_listener_that_never_answers_times_out(listener: Listener) -> None:
    listener.mode = "never"
    d = dest(listener.port, timeout_s=0.5)
    t0 = time.monotonic()
    outcome = send_mllp(d, build_oru(notice(), d))
    elapsed = time.monotonic() - t0
    assert outcome.kind == TRANSIENT and "no ACK" in (outcome.error or "")
    assert 0.4 <= elapsed < 2.0
    assert_no_phi(outcome.error)


def test_not_a_message_is_permanent() -> None:
    outcome = send_mllp(dest(1), b"hello")
    assert outcome.kind == PERMANENT
