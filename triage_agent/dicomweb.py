"""Delivery over DICOMweb: STOW-RS (PS3.18 10.5) to ``[[dicomweb_destinations]]``.

One multipart/related POST of the stored files, byte for byte, to ``<url>/studies``; the answer is
read per instance (ReferencedSOPSequence = stored, FailedSOPSequence = refused with a DICOM failure
reason) and turned into the same outcomes as a C-STORE, so the delivery ledger retries and
dead-letters STOW deliveries exactly like DIMSE ones. Retries are the ledger's: no request is
repeated here. Credentials are read from their files at each send and appear in no log or error.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from triage_agent.config import DicomWebDestinationConfig
from triage_agent.delivery import DELIVERED, PERMANENT, TRANSIENT, Outcome, SendOutcome

STOW_PREFIX = "stow:"

# STOW-RS response attributes (PS3.18 Table 10.5.3-1).
_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_SEQ = "00081199"
_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"

_REASONS = {  # PS3.18 Table 10.5.3-2 and PS3.4 C-STORE statuses a STOW service may give
    0x0110: "processing failure", 0x0122: "SOP class not supported",
    0x0124: "not authorised", 0xA700: "out of resources", 0xA900: "data set does not match "
    "SOP class", 0xC000: "cannot understand", 0xC122: "referenced transfer syntax not supported",
}


def stow_destination_key(dest: DicomWebDestinationConfig) -> str:
    return STOW_PREFIX + dest.name


def classify_failure_reason(reason: int) -> Outcome:
    """A FailedSOPSequence item's reason: out of resources may pass, anything else will not."""
    return TRANSIENT if 0xA700 <= reason <= 0xA7FF else PERMANENT


def classify_http(code: int) -> Outcome:
    """The whole request's outcome when the answer names no instance.

    Timeouts, throttling, server errors and what an admin fixes on either side (credentials,
    the URL, a proxy) are retried; a request the server understood and refused is not.
    """
    if 200 <= code < 300:
        return DELIVERED
    if code in (401, 403, 404, 405, 407, 408, 421, 425, 429) or code >= 500 or code < 400:
        return TRANSIENT
    return PERMANENT  # 400, 409, 413, 415, 422...: the same bytes get the same answer


def _http_text(code: int, reason: str) -> str:
    text = f"HTTP {code} {reason}".rstrip()
    if code in (401, 403, 407):
        text += " (the destination refused the credentials: check username and password_file " \
                "or token_file)"
    elif code in (404, 405):
        text += " (no STOW-RS service there: check url)"
    return text


def _reason_text(reason: int) -> str:
    name = _REASONS.get(reason) or _REASONS.get(reason & 0xFF00, "")
    return f"refused by the destination: failure reason 0x{reason:04X}" + (
        f" ({name})" if name else "")


def _session(dest: DicomWebDestinationConfig) -> requests.Session:
    """A session carrying the destination's credentials (OSError: a file is unreadable). Proxy
    settings come from the environment (HTTPS_PROXY, NO_PROXY) as for any HTTP client."""
    s = requests.Session()
    if dest.password_file is not None:
        s.auth = (dest.username, dest.password_file.read_text(encoding="utf-8").strip())
    elif dest.token_file is not None:
        s.headers["Authorization"] = "Bearer " + dest.token_file.read_text(encoding="utf-8").strip()
    return s


def _multipart(blobs: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), b)
             for b in blobs]
    body = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _per_instance(body: bytes) -> tuple[set[str], dict[str, int]] | None:
    """(stored UIDs, refused UID -> reason) from a DICOM JSON STOW answer; None if it is none."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]
    if not isinstance(doc, dict) or not ({_FAILED_SOP_SEQ, _REFERENCED_SOP_SEQ} & doc.keys()):
        return None

    def items(tag: str) -> list[dict]:
        value = doc.get(tag)
        seq = value.get("Value", []) if isinstance(value, dict) else []
        return [i for i in seq if isinstance(i, dict)]

    def first(item: dict, tag: str) -> object:
        values = item.get(tag, {}).get("Value") or [None]
        return values[0]

    stored = {str(first(i, _SOP_INSTANCE_UID)) for i in items(_REFERENCED_SOP_SEQ)}
    refused: dict[str, int] = {}
    for i in items(_FAILED_SOP_SEQ):
        reason = first(i, _FAILURE_REASON)
        refused[str(first(i, _SOP_INSTANCE_UID))] = reason if isinstance(reason, int) else 0x0110
    return stored, refused


def outcomes_from_response(code: int, reason: str, body: bytes,
                           uids: list[str]) -> list[SendOutcome]:
    """One outcome per instance, in order, from the STOW-RS answer (status line and body)."""
    answer = _per_instance(body)
    whole = classify_http(code)
    # For the circuit breaker an HTTP status is an answer, except a gateway's word that the
    # service behind it is down or unreachable (502, 503, 504).
    answered = code not in (502, 503, 504)
    if answer is None:
        if whole == DELIVERED:
            return [SendOutcome(DELIVERED, 0x0000, None)] * len(uids)
        return [SendOutcome(whole, None, _http_text(code, reason), answered)] * len(uids)
    stored, refused = answer
    outcomes = []
    for uid in uids:
        if uid in refused:
            fr = refused[uid]
            outcomes.append(SendOutcome(classify_failure_reason(fr), fr, _reason_text(fr)))
        elif uid in stored:
            outcomes.append(SendOutcome(DELIVERED, 0x0000, None))
        elif whole == DELIVERED:  # 2xx, yet this instance is neither listed as stored nor refused
            outcomes.append(SendOutcome(TRANSIENT, None, f"HTTP {code}: the destination did "
                                        "not confirm this instance", answered))
        else:
            outcomes.append(SendOutcome(whole, None, _http_text(code, reason), answered))
    return outcomes


def send_stow(dest: DicomWebDestinationConfig, files: list[Path]) -> list[SendOutcome]:
    """Store ``files`` in one STOW-RS request; one outcome per file, in order."""
    unreadable = SendOutcome(PERMANENT, None, "output file is not readable DICOM")
    blobs: dict[int, tuple[str, bytes]] = {}
    for i, f in enumerate(files):
        try:
            blobs[i] = (str(dcmread(f, stop_before_pixels=True).SOPInstanceUID), f.read_bytes())
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            continue
    sent = _post(dest, [b for _, b in blobs.values()], [u for u, _ in blobs.values()])
    by_index = dict(zip(blobs, sent, strict=True))
    return [by_index.get(i, unreadable) for i in range(len(files))]


def _post(dest: DicomWebDestinationConfig, blobs: list[bytes],
          uids: list[str]) -> list[SendOutcome]:
    if not blobs:
        return []
    n = len(blobs)
    try:
        session = _session(dest)
    except OSError as e:  # the path is configuration, not a secret; the content is never shown
        return [SendOutcome(TRANSIENT, None, f"cannot read the credentials file "
                            f"{e.filename}: {e.strerror}")] * n
    body, content_type = _multipart(blobs)
    # Given per request: a session's CA bundle would yield to REQUESTS_CA_BUNDLE.
    verify: str | bool = str(dest.ca_certificate) if dest.ca_certificate else True
    try:
        with session:
            rsp = session.post(dest.url + "/studies", data=body, timeout=dest.timeout_s,
                               verify=verify, headers={"Content-Type": content_type,
                                                       "Accept": "application/dicom+json"})
    except requests.exceptions.SSLError as e:
        return [SendOutcome(TRANSIENT, None, f"TLS failed: {_cause(e)}")] * n
    except requests.exceptions.Timeout:
        return [SendOutcome(TRANSIENT, None,
                            f"no answer within {dest.timeout_s:g} s (timeout_s)")] * n
    except requests.exceptions.ConnectionError as e:
        return [SendOutcome(TRANSIENT, None, f"cannot connect: {_cause(e)}")] * n
    except requests.exceptions.RequestException as e:
        return [SendOutcome(TRANSIENT, None, f"request failed: {e.__class__.__name__}")] * n
    return outcomes_from_response(rsp.status_code, rsp.reason or "", rsp.content, uids)


def _cause(e: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error ("Connection refused",
    "certificate verify failed..."), without the request it came from."""
    while e.__context__ is not None or e.__cause__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    args = getattr(e, "args", ())
    text = str(args[-1] if args else e)
    if hasattr(e, "strerror") and getattr(e, "strerror", None):
        text = str(e.strerror)
    return text[:300]
