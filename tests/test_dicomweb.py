"""DICOMweb STOW-RS delivery against a real Orthanc with its DICOMweb plugin: the node's SR and
heat maps arrive, the ledger retries and dead-letters as for C-STORE, refusals and credentials."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.conftest import require_tool
from tests.factories import make_series
from tests.peers import Orthanc, free_port
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent import db
from triage_agent.config import AgentConfig, DicomWebDestinationConfig
from triage_agent.delivery import DELIVERED, PERMANENT, TRANSIENT
from triage_agent.dicomweb import outcomes_from_response, send_stow
from triage_agent.models import Delivery, Event, Job, Output, Result, Series, SeriesState, Study
from triage_agent.sender import Sender
from triage_agent.storage import Storage

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
CANARY_NAME, CANARY_ID = "CANARYWEB^PATIENT", "CANARYWEB991"
SECRET = "s3cret-CANARY-7f1e"


def stow_answer(stored: list[str], refused: dict[str, int]) -> bytes:
    """A STOW-RS response body in DICOM JSON, as PS3.18 defines it."""
    def seq(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"vr": "SQ", "Value": items}

    return json.dumps({
        "00081199": seq([{"00081155": {"vr": "UI", "Value": [u]}} for u in stored]),
        "00081198": seq([{"00081155": {"vr": "UI", "Value": [u]},
                          "00081197": {"vr": "US", "Value": [r]}} for u, r in refused.items()]),
    }).encode()


@pytest.mark.parametrize(
    ("code", "body", "kinds", "text"),
    [
        (200, b"", [DELIVERED, DELIVERED], None),
        (200, stow_answer(["1", "2"], {}), [DELIVERED, DELIVERED], None),
        (202, stow_answer(["1"], {"2": 0xA700}), [DELIVERED, TRANSIENT], "0xA700 (out of"),
        (409, stow_answer([], {"1": 0x0110, "2": 0x0110}), [PERMANENT, PERMANENT],
         "failure reason 0x0110 (processing failure)"),
        (400, stow_answer(["2"], {"1": 0xC000}), [PERMANENT, DELIVERED], "0xC000 (cannot"),
        (200, stow_answer(["1"], {}), [DELIVERED, TRANSIENT], "did not confirm"),
        (503, b"<html>down</html>", [TRANSIENT, TRANSIENT], "HTTP 503 Service Unavailable"),
        (401, b"", [TRANSIENT, TRANSIENT], "refused the credentials"),
        (404, b"", [TRANSIENT, TRANSIENT], "check url"),
        (413, b"", [PERMANENT, PERMANENT], "HTTP 413"),
    ],
)
def test_stow_answers_map_to_ledger_outcomes(code: int, body: bytes, kinds: list[str],
                                             text: str | None) -> None:
    reasons = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
               404: "Not Found", 409: "Conflict", 413: "Payload Too Large",
               503: "Service Unavailable"}
    outs = outcomes_from_response(code, reasons[code], body, ["1", "2"])
    assert [o.kind for o in outs] == kinds
    assert all(o.unanswered == (code == 503) for o in outs)  # what the circuit breaker counts
    errors = " | ".join(o.error or "" for o in outs)
    assert (text in errors) if text else errors == " | "


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    require_tool("Orthanc", "orthanc")
    o = Orthanc(tmp_path / "orthanc", dicomweb=True).start()
    yield o
    o.stop()


def web(url: str, **kw: Any) -> DicomWebDestinationConfig:
    return DicomWebDestinationConfig(name="web", url=url, **{"timeout_s": 5, **kw})


def sop_classes_in(pacs: Orthanc) -> dict[str, str]:
    """SOPInstanceUID -> SOPClassUID of every instance the PACS holds (its REST API)."""
    out = {}
    for iid in pacs.get("/instances"):
        tags = pacs.get(f"/instances/{iid}/simplified-tags")
        out[tags["SOPInstanceUID"]] = tags["SOPClassUID"]
    return out


def canary_series(folder: Path, n: int = 2, seed: int = 5) -> list[Path]:
    files = make_series(folder, n=n, seed=seed, size=32)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
        ds.save_as(f)
    return files


def test_stow_stores_resend_is_idempotent_and_refusal_is_permanent(
    pacs: Orthanc, tmp_path: Path
) -> None:
    files = canary_series(tmp_path / "ct")
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    first = send_stow(web(pacs.dicomweb_url), files)
    assert [o.kind for o in first] == [DELIVERED, DELIVERED]
    assert set(sop_classes_in(pacs)) == set(uids)
    # A resend after a crash (same UIDs, same bytes) is not an error and stores no second copy.
    assert [o.kind for o in send_stow(web(pacs.dicomweb_url), files)] == [DELIVERED, DELIVERED]
    assert len(pacs.get("/instances")) == 2

    # An object the PACS cannot understand (no Series Instance UID) is refused on its own: a
    # permanent failure with the PACS's reason, while the good one in the same request is stored.
    broken = pydicom.dcmread(files[0])
    del broken.SeriesInstanceUID
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.save_as(tmp_path / "broken.dcm")
    good = make_series(tmp_path / "good", n=1, seed=6, size=32)
    outs = send_stow(web(pacs.dicomweb_url), [tmp_path / "broken.dcm", *good])
    assert [o.kind for o in outs] == [PERMANENT, DELIVERED]
    assert outs[0].status == 0xC000 and "0xC000 (cannot understand)" in (outs[0].error or "")
    assert CANARY_ID not in (outs[0].error or "") and "CANARYWEB" not in (outs[0].error or "")
    assert len(pacs.get("/instances")) == 3

    # Not DICOM at all (a damaged output file): permanent, without a request.
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    assert send_stow(web(pacs.dicomweb_url), [tmp_path / "junk.dcm"])[0].kind == PERMANENT


def test_unreachable_and_silent_destinations_are_retryable(tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=1, seed=7, size=32)
    refused = send_stow(web(f"http://127.0.0.1:{free_port()}/dicom-web"), files)[0]
    assert refused.kind == TRANSIENT and "cannot connect" in (refused.error or "")
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        out = send_stow(web(f"http://127.0.0.1:{port}/dicom-web", timeout_s=0.5), files)[0]
    assert out.kind == TRANSIENT and out.error == "no answer within 0.5 s (timeout_s)"
    assert refused.unanswered and out.unanswered  # counted by the destination's circuit breaker


def test_basic_auth_and_bearer_token_from_files_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_tool("Orthanc", "orthanc")
    files = make_series(tmp_path / "ct", n=2, seed=8, size=32)
    (tmp_path / "right").write_text(SECRET + "\n")
    (tmp_path / "wrong").write_text("not-" + SECRET)
    # The PACS checks the Authorization header on its DICOMweb path (a Lua filter: Orthanc has
    # no bearer tokens of its own); its REST API stays open for the test's checks.
    basic = base64.b64encode(f"triage:{SECRET}".encode()).decode()
    lua = tmp_path / "auth.lua"
    lua.write_text(
        "function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n"
        "  if string.find(uri, '^/dicom%-web') == nil then return true end\n"
        f"  local a = headers['authorization']\n"
        f"  return a == 'Bearer {SECRET}' or a == 'Basic {basic}'\n"
        "end\n")
    pacs = Orthanc(tmp_path / "auth", dicomweb=True, LuaScripts=[str(lua)]).start()
    caplog.set_level(logging.DEBUG)
    try:
        for auth in ({"username": "triage", "password_file": tmp_path / "wrong"},
                     {"token_file": tmp_path / "wrong"}, {}):
            out = send_stow(web(pacs.dicomweb_url, **auth), files[:1])[0]
            assert out.kind == TRANSIENT and "HTTP 403" in (out.error or ""), auth
            assert "check username and password_file or token_file" in (out.error or "")
        assert pacs.get("/instances") == []
        for auth, f in (({"username": "triage", "password_file": tmp_path / "right"}, files[0]),
                        ({"token_file": tmp_path / "right"}, files[1])):
            assert send_stow(web(pacs.dicomweb_url, **auth), [f])[0].kind == DELIVERED, auth
        assert len(pacs.get("/instances")) == 2
        missing = send_stow(web(pacs.dicomweb_url, token_file=tmp_path / "nope"), files)[0]
        assert missing.kind == TRANSIENT and "cannot read the credentials file" in (
            missing.error or "")
    finally:
        pacs.stop()
    assert caplog.records and not any(SECRET in r.getMessage() for r in caplog.records)


class TLSRelay:
    """A TLS terminator in front of Orthanc's HTTP port, as nginx would be (Debian's Orthanc
    1.10 crashes on its own HTTPS requests). Relays bytes both ways; handshakes that fail end."""

    def __init__(self, cert: Path, key: Path, target_port: int) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target_port = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

        threading.Thread(target=pipe, args=(upstream, tls), daemon=True).start()
        pipe(tls, upstream)

    def close(self) -> None:
        self.server.close()


def test_https_verified_against_the_configured_ca(
    pacs: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.tls_util import make_pki

    pki = make_pki(tmp_path / "pki")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca1.cert))  # ca_certificate wins over it
    relay = TLSRelay(pki.server.cert, pki.server.key, pacs.http_port)
    url = f"https://127.0.0.1:{relay.port}/dicom-web"
    files = make_series(tmp_path / "ct", n=1, seed=9, size=32)
    try:
        wrong = send_stow(web(url, ca_certificate=pki.ca2.cert), files)[0]
        assert wrong.kind == TRANSIENT and "TLS failed" in (wrong.error or "")
        assert "certificate verify failed" in (wrong.error or "")
        assert pacs.get("/instances") == []
        ok = send_stow(web(url, ca_certificate=pki.ca1.cert), files)[0]
        assert ok.kind == DELIVERED and len(pacs.get("/instances")) == 1
    finally:
        relay.close()


def test_config_rejects_credentials_in_the_url_and_half_given_auth() -> None:
    for bad, words in (
        ({"url": "https://u:pw@pacs.example.org/dicom-web"}, "credentials do not belong"),
        ({"url": "pacs.example.org/dicom-web"}, "http:// or https://"),
        ({"url": "https://pacs", "username": "u"}, "needs both username and password_file"),
        ({"url": "https://pacs", "username": "u", "password_file": "p", "token_file": "t"},
         "not both"),
    ):
        with pytest.raises(ValueError, match=words):
            AgentConfig.model_validate({"dicomweb_destinations": [{"name": "w", **bad}]})
    cfg = AgentConfig.model_validate({"dicomweb_destinations": [
        {"name": "w", "url": "https://pacs/dicom-web/", "token_file": "vna.token"}]})
    resolved = cfg.resolved(Path("/etc/triage-agent")).dicomweb_destinations[0]
    assert resolved.url == "https://pacs/dicom-web"
    assert resolved.token_file == Path("/etc/triage-agent/vna.token")


# ----------------------------------------------------------------------------- through the ledger


def scored_result(s: Any) -> int:
    """Rows of a scored series (study, series, job, result); returns the result's id."""
    st = Study(study_instance_uid=generate_uid())
    s.add(st)
    s.flush()
    se = Series(series_instance_uid=generate_uid(), study_id=st.id, generation=1,
                state=SeriesState.SCORED)
    s.add(se)
    s.flush()
    job = Job(series_id=se.id, generation=1, state="done")
    s.add(job)
    s.flush()
    res = Result(job_id=job.id, series_id=se.id, score=1.0, verdict="abnormal", threshold=0.5,
                 model_name="m", model_version="1", weights_sha256="x")
    s.add(res)
    s.flush()
    return int(res.id)


def ledger_rows(sessions: Any, storage: Storage, files: list[Path], destination: str) -> list[int]:
    """A scored series whose outputs are ``files``, one delivery each to ``destination``."""
    with sessions() as s, s.begin():
        rid = scored_result(s)
        ids = []
        for i, f in enumerate(files):
            rel = f"outputs/{i}-{f.name}"
            storage.write_atomic(rel, [f.read_bytes()])
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            out = Output(result_id=rid, kind="sr", sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=str(ds.SOPInstanceUID),
                         series_instance_uid=str(ds.get("SeriesInstanceUID", "")), path=rel)
            s.add(out)
            s.flush()
            d = Delivery(output_id=out.id, destination=destination)
            s.add(d)
            s.flush()
            ids.append(d.id)
        return ids


def ledger_cfg(dest: DicomWebDestinationConfig, max_attempts: int = 8) -> AgentConfig:
    return AgentConfig(dicomweb_destinations=[dest]).model_copy(update={
        "delivery": AgentConfig().delivery.model_copy(update={
            "max_attempts": max_attempts, "backoff_base_s": 0.01, "backoff_cap_s": 0.02})})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_scored_series_sr_and_heat_maps_arrive_by_stow(
    db_url: str, pacs: Orthanc, tiny_ckpt: Path, tmp_path: Path  # noqa: F811
) -> None:
    from triage_model.checkpoint import load_detector
    from triage_model.synth import make_case

    from triage_agent.app import Model
    from triage_agent.inference import score_series
    from triage_agent.publish import build_outputs
    from triage_agent.synth_dicom import write_case_dicom
    from triage_agent.worker import Worker

    det = load_detector(tiny_ckpt, device="cpu")
    files = write_case_dicom(make_case(21, "subdural_haematoma", matrix=128), tmp_path / "h")
    res = score_series(files, det, threshold=-1e9)  # "abnormal", so heat maps are built too
    cfg = ledger_cfg(web(pacs.dicomweb_url))
    storage = Storage(tmp_path / "storage")
    built = build_outputs(cfg=cfg, storage=storage, source_paths=files, result=res,
                          model=Model(det.name, det.version, det.weights_sha256, det),
                          uid_key="1.2.3/1/abc", supersedes_path=None, priority="urgent")
    db.upgrade(db_url)
    sessions = db.session_factory(db.make_engine(db_url))
    with sessions() as s, s.begin():  # the rows the worker writes for a scored series
        Worker(cfg, sessions, storage, None, None, "w")._add_outputs(s, scored_result(s), built)
    sender = Sender(cfg, sessions, storage)
    assert sender.run_once() == len(built) == 6  # the SR and five heat maps
    with sessions() as s:
        rows = s.scalars(select(Delivery)).all()
        assert {d.destination for d in rows} == {"stow:web"}
        assert all(d.state == "delivered" and d.attempts == 1 for d in rows)
        assert s.scalar(select(Series.state)) == SeriesState.DELIVERED
    held = sop_classes_in(pacs)
    assert held == {o.sop_instance_uid: o.sop_class_uid for o in built}
    assert sorted(held.values()) == sorted([SR_CLASS] + [SC_CLASS] * 5)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_unreachable_stow_retries_dead_letters_and_retry_command_resends(
    db_url: str, tmp_path: Path
) -> None:
    require_tool("Orthanc", "orthanc")
    pacs = Orthanc(tmp_path / "later", dicomweb=True)  # configured, not yet started
    db.upgrade(db_url)
    sessions = db.session_factory(db.make_engine(db_url))
    storage = Storage(tmp_path / "storage")
    files = canary_series(tmp_path / "ct", n=1)
    (did,) = ledger_rows(sessions, storage, files, "stow:web")
    sender = Sender(ledger_cfg(web(pacs.dicomweb_url), max_attempts=2), sessions, storage)

    assert sender.run_once() == 1
    with sessions() as s:
        d = s.get(Delivery, did)
        assert d.state == "pending" and d.attempts == 1 and "cannot connect" in d.last_error
    time.sleep(0.05)
    assert sender.run_once() == 1
    with sessions() as s:
        d = s.get(Delivery, did)
        assert d.state == "dead" and "gave up after 2 attempts" in d.last_error
        assert s.scalar(select(Series.state)) == SeriesState.FAILED
    assert sender.run_once() == 0

    pacs.start()
    try:
        config = tmp_path / "agent.toml"
        config.write_text(f'[database]\nurl = "{db_url}"\n[storage]\nroot = "{storage.root}"\n')
        r = subprocess.run([sys.executable, "-m", "triage_agent.cli", "retry", "--config",
                            str(config)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "1 dead-lettered delivery re-queued" in r.stdout, r.stderr
        assert sender.run_once() == 1
        with sessions() as s:
            d = s.get(Delivery, did)
            assert d.state == "delivered" and d.last_status == 0 and d.last_error is None
            assert s.scalar(select(Series.state)) == SeriesState.DELIVERED
        assert set(sop_classes_in(pacs)) == {str(pydicom.dcmread(files[0]).SOPInstanceUID)}
    finally:
        pacs.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_refused_instance_is_dead_lettered_at_once_with_the_reason(
    db_url: str, pacs: Orthanc, tmp_path: Path
) -> None:
    db.upgrade(db_url)
    sessions = db.session_factory(db.make_engine(db_url))
    storage = Storage(tmp_path / "storage")
    broken = pydicom.dcmread(canary_series(tmp_path / "ct", n=1)[0])
    del broken.SeriesInstanceUID  # the PACS cannot file it: refused with 0xC000
    broken.save_as(tmp_path / "broken.dcm")
    good = canary_series(tmp_path / "good", n=1, seed=11)
    bad_id, good_id = ledger_rows(sessions, storage, [tmp_path / "broken.dcm", *good], "stow:web")
    assert Sender(ledger_cfg(web(pacs.dicomweb_url)), sessions, storage).run_once() == 2
    with sessions() as s:
        bad, ok = s.get(Delivery, bad_id), s.get(Delivery, good_id)
        assert ok.state == "delivered"
        assert bad.state == "dead" and bad.attempts == 1 and bad.last_status == 0xC000
        assert "refused by the destination: failure reason 0xC000 (cannot understand)" in (
            bad.last_error)
        event = s.scalars(select(Event).where(Event.kind == "delivery_dead")).one()
        for text in (bad.last_error, event.detail):
            assert "CANARYWEB" not in text and CANARY_ID not in text
