"""DICOMweb STOW-RS delivery against a real Orthanc with its DICOMweb plugin: the node's SR and
heat maps arrive, the ledger retries and dead-letters as for C-STORE, refusals and credentials."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import require_tool
from tests.factories import make_series
from tests.peers import Orthanc, free_port
from triage_agent.config import AgentConfig, DicomWebDestinationConfig
from triage_agent.delivery import DELIVERED, PERMANENT, TRANSIENT
from triage_agent.dicomweb import outcomes_from_response, send_stow

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


def test_https_verified_against_the_configured_ca(pacs: Orthanc, tmp_path: Path) -> None:
    from tests.tls_util import make_pki

    pki = make_pki(tmp_path / "pki")
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
