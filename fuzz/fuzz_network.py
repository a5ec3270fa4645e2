#!/usr/bin/env python
"""Fuzz a real node (``triage-agent serve`` subprocess) over the network, for a time budget.

Two kinds of examples, both drawn by hypothesis:

* **datasets** sent with a pynetdicom SCU (``fuzz.common.store_input``: mutated tags, VRs and
  lengths, ``../`` and newline UIDs, huge Rows/Columns, pixel length mismatches, 10 000-deep
  sequences, non-CT SOP classes, byte-level corruption), written as a Part 10 file so the SCU
  sends the bytes exactly as drawn;
* **raw PDUs** over a socket: a valid A-ASSOCIATE-RQ then mutated P-DATA-TF (bad PDV lengths,
  unknown presentation context, garbage command sets), truncated PDUs, unknown PDU types,
  declared lengths up to 4 GiB (at most 64 KiB is actually sent), data before association,
  mutated A-ASSOCIATE-RQs, random bytes.

After every example: the process is alive, ``storage/tmp`` is empty, nothing new exists outside
the storage root, a Success is backed by an instance row, no C-STORE answered 0xC211 (exception
in handler) and the node log has no traceback. Every 10 examples and after each batch: C-ECHO
answers, the storage tree holds only content-addressed files.

    python fuzz/fuzz_network.py --minutes 10
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hseed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_file_meta_info  # noqa: E402
from pydicom.uid import UID  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.dsutils import encode  # noqa: E402

from fuzz.common import (  # noqa: E402
    CT,
    MR,
    TRANSFER_SYNTAXES,
    base_dataset,
    encode_for,
    store_input,
)

FINDINGS = HERE / "findings" / "network"
VERIFICATION = "1.2.840.10008.1.1"
APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
SEND_CAP = 64 * 1024  # never send more than this many bytes of a huge declared length


class Finding(AssertionError):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"[{stage}] {message}")
        self.stage = stage


# --------------------------------------------------------------------------- PDU building

def _item(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0]) + struct.pack(">H", len(payload)) + payload


def assoc_rq(ts: str, *, called: bytes = b"TRIAGE", calling: bytes = b"FUZZSCU",
             sop_class: str = CT, max_pdu: int = 16384) -> bytes:
    pcs = b""
    for pcid, abstract, tsyn in ((1, sop_class, ts), (3, VERIFICATION, "1.2.840.10008.1.2")):
        pcs += _item(0x20, bytes([pcid, 0, 0, 0]) + _item(0x30, abstract.encode())
                     + _item(0x40, tsyn.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", max_pdu))
                 + _item(0x52, b"1.2.826.0.1.3680043.8.498.1"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + b"\0" * 32
            + _item(0x10, APP_CONTEXT) + pcs + user)
    return bytes([0x01, 0]) + struct.pack(">I", len(body)) + body


def pdu(kind: int, body: bytes, declared: int | None = None) -> bytes:
    return bytes([kind, 0]) + struct.pack(">I", len(body) if declared is None else declared) + body


def pdv(pcid: int, control: int, fragment: bytes, declared: int | None = None) -> bytes:
    n = len(fragment) + 2 if declared is None else declared
    return struct.pack(">I", n) + bytes([pcid, control]) + fragment


def store_command(sop_class: str, sop_uid: str, message_id: int = 1,
                  command_field: int = 0x0001, has_dataset: bool = True) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = command_field
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000 if has_dataset else 0x0101
    cmd.AffectedSOPInstanceUID = sop_uid
    body = encode(cmd, True, True)
    assert body is not None
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def store_pdus(cmd: bytes, data: bytes, frag: int = 65536) -> list[bytes]:
    """A C-STORE-RQ as P-DATA-TF PDUs: the command, then the data set in fragments."""
    out = [pdu(4, pdv(1, 3, cmd))]
    chunks = [data[i:i + frag] for i in range(0, len(data), frag)] or [b""]
    for i, c in enumerate(chunks):
        out.append(pdu(4, pdv(1, 2 if i == len(chunks) - 1 else 0, c)))
    return out


def recv_exact(sock: socket.socket, n: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def read_pdu(sock: socket.socket, timeout: float) -> tuple[int, bytes] | None:
    try:
        head = recv_exact(sock, 6, timeout)
        if len(head) < 6:
            return None
        n = struct.unpack(">I", head[2:])[0]
        return head[0], recv_exact(sock, min(n, 1 << 20), timeout)
    except (TimeoutError, OSError):
        return None


def _accepted_pc1(ac_body: bytes) -> bool:
    i = 68
    while i + 4 <= len(ac_body):
        kind, n = ac_body[i], struct.unpack(">H", ac_body[i + 2:i + 4])[0]
        if kind == 0x21 and ac_body[i + 4] == 1:
            return ac_body[i + 6] == 0
        i += 4 + n
    return False


# ------------------------------------------------------------------------ raw PDU strategies

RAW_KINDS = ["raw_dataset", "raw_dataset", "deep_sequence", "valid_store", "mutated_pdata", "bad_pdv", "truncated", "unknown_type",
             "huge_length", "before_assoc", "mutated_assoc", "release_mid", "abort_mid",
             "random"]


@st.composite
def raw_case(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(RAW_KINDS))
    ts = draw(st.sampled_from(TRANSFER_SYNTAXES))
    uid = f"1.2.826.0.1.3680043.8.498.55.{draw(st.integers(1, 10**9))}"
    ds = base_dataset(draw(st.integers(0, 3)))
    ds.SOPInstanceUID = uid
    data = encode_for(ds, ts) or b""
    cmd = store_command(CT, uid)
    case: dict[str, Any] = {"kind": kind, "ts": ts, "uid": uid, "hold_s": 0.0}
    assoc = assoc_rq(ts)
    after: list[bytes] = []
    if kind == "valid_store":
        after = [pdu(4, pdv(1, 3, cmd)), pdu(4, pdv(1, 2, data))]
    elif kind == "raw_dataset":  # a drawn data set sent as-is, no SCU reading it first
        from fuzz.fuzz_ingest import request_uids

        data, ts, rc, ru = draw(store_input())
        ds_class, u = request_uids(data, ts)
        rc, ru = (ds_class if rc is None else rc), (u if ru is None else ru)
        sop_class = rc if rc.isascii() and 0 < len(rc) <= 64 and "\\" not in rc else CT
        assoc = assoc_rq(ts, sop_class=sop_class)
        try:
            cmd = store_command(sop_class, ru)
        except Exception:  # noqa: BLE001 - pydicom cannot encode that UID; use the data set's
            cmd = store_command(sop_class, u)
        case.update(ts=ts, uid=ru, ds_uid=u)
        after = store_pdus(cmd, data)
    elif kind == "deep_sequence":
        from fuzz.common import encode_with_deep_sequence

        depth = draw(st.sampled_from([100, 1000, 10000, 20000]))
        data = encode_with_deep_sequence(ds, ts, depth) or data
        case["ds_uid"] = uid
        after = store_pdus(cmd, data)
    elif kind == "mutated_pdata":
        which = draw(st.sampled_from(["cmd", "data", "both"]))
        c, d = cmd, data
        if which in ("cmd", "both"):
            c = _mutate(draw, cmd)
        if which in ("data", "both"):
            d = _mutate(draw, data)
        after = [pdu(4, pdv(1, 3, c)), pdu(4, pdv(1, 2, d))]
    elif kind == "bad_pdv":
        pcid = draw(st.sampled_from([1, 1, 2, 3, 0, 99, 255]))
        control = draw(st.sampled_from([3, 2, 1, 0, 0xFF, 0x80]))
        declared = draw(st.sampled_from([None, 0, 1, 2, 3, len(cmd) + 100, 0xFFFFFFFF]))
        after = [pdu(4, pdv(pcid, control, cmd, declared))]
        if draw(st.booleans()):
            after.append(pdu(4, pdv(1, 2, data)))
        if draw(st.booleans()):  # two PDVs in one PDU, or dataset before command
            after = [pdu(4, pdv(1, 2, data[:100]) + pdv(1, 3, cmd))]
    elif kind == "truncated":
        full = pdu(4, pdv(1, 3, cmd)) + pdu(4, pdv(1, 2, data))
        after = [full[: draw(st.integers(1, len(full) - 1))]]
        case["hold_s"] = draw(st.sampled_from([0.0, 0.0, 0.5]))
    elif kind == "unknown_type":
        t = draw(st.sampled_from([0x00, 0x08, 0x09, 0x0F, 0x10, 0x7F, 0x80, 0xFF]))
        after = [pdu(t, draw(st.binary(max_size=64)))]
    elif kind == "huge_length":
        declared = draw(st.sampled_from([2**31 - 1, 2**32 - 1, 2**28, 2**24 + 1]))
        t = draw(st.sampled_from([4, 4, 1, 5, 7]))
        sent = draw(st.sampled_from([0, 10, 1024, SEND_CAP]))
        after = [bytes([t, 0]) + struct.pack(">I", declared) + b"\x00" * sent]
        if t == 1:
            assoc = b""
        case["hold_s"] = draw(st.sampled_from([0.0, 1.0, 2.0]))
        case["echo_while_held"] = True
    elif kind == "before_assoc":
        assoc = b""
        after = [pdu(4, pdv(1, 3, cmd)), pdu(4, pdv(1, 2, data))]
    elif kind == "mutated_assoc":
        assoc = _mutate(draw, assoc)
        after = [pdu(4, pdv(1, 3, cmd)), pdu(4, pdv(1, 2, data))]
    elif kind == "release_mid":
        after = [pdu(4, pdv(1, 3, cmd)), pdu(4, pdv(1, 0, data[: len(data) // 2])),
                 pdu(5, b"\0" * 4)]
    elif kind == "abort_mid":
        after = [pdu(4, pdv(1, 3, cmd)), pdu(4, pdv(1, 0, data[: len(data) // 2])),
                 pdu(7, b"\0\0\0\0")]
    else:
        assoc = b""
        after = [draw(st.binary(min_size=1, max_size=512))]
    case["assoc"] = assoc
    case["after"] = after
    return case


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    from fuzz.common import byte_mutation

    out = draw(byte_mutation(data))
    return out if out != data else data[: max(1, len(data) // 2)]


# ---------------------------------------------------------------------------- the harness

@dataclass
class NetworkTarget:
    base: Path | None = None
    execs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    findings: dict[str, str] = field(default_factory=dict)
    record: bool = True
    restarts: int = 0
    max_rss_kb: int = 0
    huge_length_notes: dict[str, int] = field(default_factory=dict)
    logged_tracebacks: dict[str, int] = field(default_factory=dict)
    reply_wait_s: float = 1.0  # how long to wait for the node's answer to a malformed PDU

    def __post_init__(self) -> None:
        from tests.conftest import Node

        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="fuzz-net-"))
        self.base = Path(self.base)
        self.tmp = self.base / "scratch"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.node = Node(self.base / "node", f"sqlite:///{self.base / 'node' / 'triage.db'}",
                         storage={"extra_sop_classes": [MR]},
                         node={"network_timeout_s": 20.0, "acse_timeout_s": 10.0,
                               "dimse_timeout_s": 10.0})
        os.environ["PYTHONFAULTHANDLER"] = "1"  # the node inherits it: SIGABRT dumps threads
        self.node.start()
        self._sessions = self.node.session()
        self._log_pos = 0
        self.outside_before = self._outside()
        self.ae = AE(ae_title="FUZZSCU")
        self.ae.acse_timeout = 10
        self.ae.dimse_timeout = 10
        self.ae.network_timeout = 10
        self.ae.add_requested_context(VERIFICATION)

    # ------------------------------------------------------------------------- oracles
    def _outside(self) -> set[str]:
        wd = self.node.workdir
        allowed = {"storage", "node.log", "agent.toml"}
        out = set()
        for dirpath, dirnames, filenames in os.walk(wd):
            if Path(dirpath) == wd:
                dirnames[:] = [d for d in dirnames if d not in allowed]
                filenames = [f for f in filenames
                             if f not in allowed and not f.startswith("triage.db")]
            for n in filenames + dirnames:
                out.add(os.path.relpath(os.path.join(dirpath, n), wd))
        return out

    def check(self, full: bool = False) -> None:
        proc = self.node.proc
        if proc is None or proc.poll() is not None:
            raise Finding("node", f"node process died (rc={proc.returncode if proc else None})")
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            self.max_rss_kb = max(self.max_rss_kb, rss)
        tmp = self.node.storage_root / "tmp"
        leftovers = os.listdir(tmp) if tmp.exists() else []
        if leftovers:
            time.sleep(1.0)  # a store may still be in flight on an aborted association
            leftovers = os.listdir(tmp)
            if leftovers:
                raise Finding("storage", f"temp files left in storage/tmp: {leftovers[:3]}")
        new = self._outside() - self.outside_before
        if new:
            self.outside_before |= new
            raise Finding("storage", f"files outside the storage root: {sorted(new)[:5]}")
        text = self.node.log_path.read_text(errors="replace")
        chunk, self._log_pos = text[self._log_pos:], len(text)
        self._scan_log(chunk)
        if full:
            self.echo()
            ok = re.compile(r"^(dicom/[0-9a-f]{20}/[0-9a-f]{20}/[0-9a-f]{64}\.dcm|"
                            r"quarantine/[0-9a-f]{64}\.dcm|audit-spool\.jsonl(\.lock|\.replay\.lock|\.tmp)?)$")
            for p in self.node.storage_root.rglob("*"):
                rel = p.relative_to(self.node.storage_root).as_posix()
                if p.is_symlink() or (p.is_file() and not ok.match(rel)):
                    raise Finding("storage", f"unexpected entry in storage: {rel}")

    def _scan_log(self, chunk: str) -> None:
        """A traceback through triage_agent code (other than the designed PDU-size cap) or a
        pynetdicom "Exception in handler" is a finding; tracebacks pynetdicom logs while it
        rejects a malformed PDU itself (then aborts the association) are only counted."""
        if "Exception in handler bound to" in chunk:
            i = chunk.find("Exception in handler bound to")
            raise Finding("log", "exception in a node event handler:\n" + chunk[i: i + 3000])
        lines = chunk.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("Traceback (most recent call last)"):
                continue
            j, frames = i + 1, []
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                m = re.match(r'\s+File "([^"]+)", line (\d+), in (\S+)', lines[j])
                if m:
                    frames.append(m.groups())
                j += 1
            exc = lines[j] if j < len(lines) else ""
            # _bounded_recv is the node's socket read wrapper: errors through it are the DUL's
            ours = [f for f in frames if "/triage_agent/" in f[0] and f[2] != "_bounded_recv"]
            if ours:
                where = f"{ours[-1][0].rsplit('/', 1)[-1]}:{ours[-1][1]}:{ours[-1][2]}"
                raise Finding("log", f"traceback through {where}: {exc[:100]}\n"
                              + "\n".join(lines[max(0, i - 3): j + 1])[:3000])
            last = frames[-1] if frames else ("?", "?", "?")
            key = f"{last[0].rsplit('/', 1)[-1]}:{last[2]}: {exc.split(':')[0][:40]}"
            self.logged_tracebacks[key] = self.logged_tracebacks.get(key, 0) + 1

    def echo(self, source: str = "127.0.0.2", patience_s: float = 20.0) -> None:
        """C-ECHO from another source address (the fuzz traffic comes from 127.0.0.1, and the
        node limits connections per address): "other senders keep being served"."""
        deadline = time.monotonic() + patience_s
        while True:
            assoc = self.ae.associate("127.0.0.1", self.node.port, ae_title="TRIAGE",
                                      bind_address=(source, 0))
            if assoc.is_established:
                st_ = assoc.send_c_echo()
                assoc.release()
                if st_ and "Status" in st_ and st_.Status == 0:
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        raise Finding("node", f"C-ECHO from {source} failed for {patience_s:g} s: node not "
                              f"serving ({self._conn_states()}; load average "
                              f"{os.getloadavg()[0]:.1f}){self._thread_dump()}")

    def _thread_dump(self) -> str:
        """SIGABRT the node (PYTHONFAULTHANDLER is set) and return its thread dump: tells a
        hang from CPU starvation. The node is restarted after a "node" finding anyway."""
        import signal

        proc = self.node.proc
        if proc is None or proc.poll() is not None:
            return ""
        pos = len(self.node.log_path.read_text(errors="replace"))
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(Exception):
            proc.wait(10)
        dump = self.node.log_path.read_text(errors="replace")[pos:]
        self._log_pos = len(self.node.log_path.read_text(errors="replace"))
        return "\nthread dump:\n" + dump[-12000:]

    def _conn_states(self) -> str:
        """TCP connections on the node's port by state (diagnosis of a refused C-ECHO)."""
        import subprocess

        try:
            out = subprocess.run(["ss", "-tanH", f"sport = :{self.node.port}"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return "ss unavailable"
        states: dict[str, int] = {}
        for line in out.splitlines():
            if line.split():
                states[line.split()[0]] = states.get(line.split()[0], 0) + 1
        return "node-side sockets: " + json.dumps(states)

    def same_address_echo(self) -> None:
        """Slots of aborted fuzz associations must come back (watchdog, ARTIM, acse timeout)."""
        try:
            self.echo("127.0.0.1", patience_s=30.0)
        except Finding as f:
            raise Finding("slots", "no association slot for 127.0.0.1 within 30 s after the "
                                   "fuzz associations ended (per-address slots leaked?)") from f

    def restart(self) -> None:
        self.restarts += 1
        with contextlib.suppress(Exception):
            self.node.kill()
        self.node.start()
        self._log_pos = len(self.node.log_path.read_text(errors="replace"))

    # --------------------------------------------------------------------------- examples
    def run_dataset(self, inp: tuple[bytes, str, str | None, str | None]) -> str:
        data, ts, req_class, req_uid = inp
        from fuzz.fuzz_ingest import request_uids

        if req_class is None or req_uid is None:
            c, u = request_uids(data, ts)
            req_class = c if req_class is None else req_class
            req_uid = u if req_uid is None else req_uid
        if not (req_class.isascii() and req_uid.isascii()):
            return "unsendable"
        path = self.tmp / "send.dcm"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(req_class)
        meta.MediaStorageSOPInstanceUID = UID(req_uid)
        meta.TransferSyntaxUID = UID(ts)
        meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
        buf = DicomBytesIO()
        buf.write(b"\0" * 128 + b"DICM")
        try:
            write_file_meta_info(buf, meta, enforce_standard=True)
        except Exception:  # noqa: BLE001 - the SCU cannot express it; an expected skip
            return "unsendable"
        path.write_bytes(buf.getvalue() + data)
        ae = AE(ae_title="FUZZSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        try:
            ae.add_requested_context(req_class, ts)
        except Exception:  # noqa: BLE001 - not a UID pynetdicom will propose
            return "unsendable"
        assoc = ae.associate("127.0.0.1", self.node.port, ae_title="TRIAGE")
        if not assoc.is_established:
            return "assoc-rejected"
        try:
            try:
                status = assoc.send_c_store(path)
            except Exception as e:  # noqa: BLE001 - SCU-side refusal (or pynetdicom SCU bug)
                return f"scu-refused:{type(e).__name__}"
            code = int(status.Status) if status and "Status" in status else None
        finally:
            with contextlib.suppress(Exception):
                assoc.release()
        if code is None:
            return "no-response"
        if code == 0xC211:
            raise Finding("handle_store", "0xC211: exception in the C-STORE handler")
        if code == 0:
            from sqlalchemy import select

            from triage_agent.models import Instance

            # pynetdicom's SCU takes the UIDs from the data set itself when it can read them
            uids = {req_uid.rstrip("\0 "), request_uids(data, ts)[1]}
            with self._sessions() as s:
                row = s.scalar(select(Instance.id).where(Instance.sop_instance_uid.in_(uids)))
            if row is None:
                raise Finding("ledger", "Success without an instance row")
        return f"0x{code:04X}"

    def run_raw(self, case: dict[str, Any]) -> str:
        rss_before = self.max_rss_kb
        sock = socket.create_connection(("127.0.0.1", self.node.port), timeout=5)
        outcome = "sent"
        try:
            if case["assoc"]:
                sock.sendall(case["assoc"])
                if case["kind"] != "mutated_assoc":
                    resp = read_pdu(sock, 5)
                    if resp is None or resp[0] != 0x02 or not _accepted_pc1(resp[1]):
                        return f"assoc-{'none' if resp is None else hex(resp[0])}"
            for chunk in case["after"]:
                try:
                    sock.sendall(chunk)
                except OSError:
                    outcome = "peer-closed-while-sending"
                    break
            if case.get("echo_while_held"):
                t0 = time.monotonic()
                self.echo()  # other senders unaffected while this one is stuck mid-PDU
                self.huge_length_notes["echo_ok_while_held"] = (
                    self.huge_length_notes.get("echo_ok_while_held", 0) + 1)
                self.huge_length_notes["max_echo_ms"] = max(
                    self.huge_length_notes.get("max_echo_ms", 0),
                    int((time.monotonic() - t0) * 1000))
            if case["hold_s"]:
                time.sleep(case["hold_s"])
            slow = case["kind"] in ("valid_store", "raw_dataset", "deep_sequence")
            resp = read_pdu(sock, 10.0 if slow else self.reply_wait_s)
            outcome = {None: "no-reply", 0x04: "p-data", 0x07: "a-abort", 0x06: "release-rp",
                       0x03: "a-rj", 0x02: "a-ac"}.get(resp[0] if resp else None, "other")
            code = None
            if resp is not None and resp[0] == 0x04 and b"\x00\x00\x00\x09\x02\x00" in resp[1]:
                j = resp[1].index(b"\x00\x00\x00\x09\x02\x00")  # (0000,0900) US, length 2
                code = struct.unpack("<H", resp[1][j + 8:j + 10])[0]
                outcome += f":0x{code:04X}"
            if code == 0xC211:
                raise Finding("handle_store", "0xC211: exception in the C-STORE handler")
            if case["kind"] == "valid_store" and code != 0:
                raise Finding("control", f"valid C-STORE over raw PDUs got {outcome}")
            if code == 0 and "ds_uid" in case:
                from sqlalchemy import select

                from triage_agent.models import Instance

                uids = {str(case["uid"]).rstrip("\0 "), case["ds_uid"]}
                with self._sessions() as s:
                    row = s.scalar(select(Instance.id).where(Instance.sop_instance_uid.in_(uids)))
                if row is None:
                    raise Finding("ledger", "Success without an instance row")
            if case["kind"] == "huge_length":
                key = f"huge_length:{outcome}"
                self.huge_length_notes[key] = self.huge_length_notes.get(key, 0) + 1
        finally:
            sock.close()
        self.check()
        if self.max_rss_kb - rss_before > 512 * 1024:
            raise Finding("memory", f"node RSS grew by {(self.max_rss_kb - rss_before) // 1024} "
                                    f"MiB on a {case['kind']} PDU")
        return outcome

    # --------------------------------------------------------------------------- bookkeeping
    def run(self, kind: str, inp: Any) -> None:
        self.execs += 1
        try:
            if kind == "dataset":
                out = "ds:" + self.run_dataset(inp)
                self.check(full=self.execs % 10 == 0)
            else:
                out = "raw:" + inp["kind"] + ":" + self.run_raw(inp)
                if self.execs % 10 == 0:
                    self.check(full=True)
        except Finding as f:
            if not self.record:
                raise
            self._record(f, kind, inp)
            out = "finding"
            if f.stage == "node":
                self.restart()
        except Exception as e:  # noqa: BLE001 - the harness's own socket/SCU trouble
            if not self.record:
                raise
            out = f"harness-error:{type(e).__name__}"
            FINDINGS.mkdir(parents=True, exist_ok=True)
            with open(FINDINGS.parent / "network-harness-errors.log", "a") as fh:
                fh.write(f"--- {kind} {inp!r}"[:3000] + "\n" + traceback.format_exc() + "\n")
        self.outcomes[out] = self.outcomes.get(out, 0) + 1

    def _record(self, f: Finding, kind: str, inp: Any) -> None:
        sig = f"{f.stage}|{str(f).splitlines()[0].split(' (')[0][:100]}"
        sig = re.sub(r"\[[^\]]*\.part[^\]]*\]", "[..]", sig)
        if sig in self.findings:
            return
        self.findings[sig] = str(f)[:20000]
        FINDINGS.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha1(sig.encode()).hexdigest()[:10]
        (FINDINGS / f"{h}.txt").write_text(
            f"signature: {sig}\nkind: {kind}\ninput: {inp!r}"[:20000] + f"\n\n{str(f)[:20000]}\n")
        print(f"FINDING {h}: {sig}", file=sys.stderr, flush=True)

    def summary(self, seconds: float) -> dict[str, Any]:
        return {"harness": "fuzz_network", "executions": self.execs,
                "seconds": round(seconds, 1), "findings": len(self.findings),
                "finding_signatures": sorted(self.findings), "node_restarts": self.restarts,
                "node_max_rss_mib": self.max_rss_kb // 1024,
                "huge_length": self.huge_length_notes,
                "tracebacks_logged_by_pynetdicom": self.logged_tracebacks,
                "outcomes": dict(sorted(self.outcomes.items()))}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.node.stop(10)
        import shutil

        assert self.base is not None
        shutil.rmtree(self.base, ignore_errors=True)


def run_budget(minutes: float, batch: int = 25, seed: int | None = None,
               target: NetworkTarget | None = None) -> NetworkTarget:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL + 1)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    import warnings

    warnings.simplefilter("ignore")
    target = target or NetworkTarget()
    started = time.monotonic()
    deadline = started + minutes * 60
    rnd = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    cfg = settings(max_examples=batch, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck), phases=[Phase.generate])

    @cfg
    @given(store_input())
    def datasets(inp: Any) -> None:
        if time.monotonic() < deadline:
            target.run("dataset", inp)

    @cfg
    @given(raw_case())
    def raw(inp: Any) -> None:
        if time.monotonic() < deadline:
            target.run("raw", inp)

    k = 0
    while time.monotonic() < deadline:
        try:
            hseed(rnd + k)(datasets if k % 2 == 0 else raw)()
        except Exception as e:  # noqa: BLE001 - hypothesis itself (flaky draw etc.); go on
            target.outcomes[f"batch-error:{type(e).__name__}"] = (
                target.outcomes.get(f"batch-error:{type(e).__name__}", 0) + 1)
        k += 1
        try:
            target.check(full=True)
            target.same_address_echo()
        except Finding as f:
            target._record(f, "batch", None)
            if f.stage == "node":
                target.restart()
        if k % 4 == 0:
            (FINDINGS.parent).mkdir(parents=True, exist_ok=True)
            (FINDINGS.parent / "network-status.json").write_text(
                json.dumps(target.summary(time.monotonic() - started), indent=1))
    rec = target.summary(time.monotonic() - started)
    (FINDINGS.parent).mkdir(parents=True, exist_ok=True)
    (FINDINGS.parent / "network-status.json").write_text(json.dumps(rec, indent=1))
    print("SUMMARY " + json.dumps(rec), file=sys.stderr, flush=True)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the node's work folder")
    args = ap.parse_args()
    import signal

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds into the finally below: the node is stopped

    signal.signal(signal.SIGTERM, stop)
    target = NetworkTarget()
    try:
        run_budget(args.minutes, seed=args.seed, target=target)
    finally:
        if args.keep:
            print(f"work folder: {target.base}", file=sys.stderr)
            target.node.stop(10)
        else:
            target.close()
    return 1 if target.findings else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
