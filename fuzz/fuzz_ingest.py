#!/usr/bin/env python
"""In-process fuzz target for the C-STORE path: bytes -> decode -> validate -> persist -> preprocess.

One input is the raw C-STORE data set (what pynetdicom hands ``handle_store`` as
``event.request.DataSet``) plus the presentation context's transfer syntax and the request's
Affected SOP Class/Instance UIDs. The target runs the node's real ``receiver.handle_store`` with a
stand-in event whose ``dataset`` decodes exactly like pynetdicom's (``dsutils.decode``), against a
real ``Storage`` and a migrated SQLite database, then feeds any stored file to
``preprocess.read_series``/``model_inputs`` as the worker would.

Findings (anything else is an expected rejection):

* an exception escaping ``handle_store`` (pynetdicom would answer 0xC211 and log a traceback);
* a status that is not an int/Dataset, Success without a stored row/file, a row without a file;
* a file created outside the storage root, or a leftover file in ``storage/tmp``;
* a stored file whose ``read_series``/``model_inputs`` raises anything but ``PreprocessError``.

Run:
    python fuzz/fuzz_ingest.py -max_total_time=600             # atheris (libFuzzer) mode
    python fuzz/fuzz_ingest.py --hypothesis --minutes 10        # hypothesis mode
    python fuzz/fuzz_ingest.py --make-corpus                    # (re)build fuzz/corpus/ingest
    python fuzz/fuzz_ingest.py --replay FILE...                 # run saved inputs once

Atheris input format: byte 0 picks the transfer syntax (bits 0-1) and whether the request UIDs
are copied from the data set (bit 2 clear) or fixed; the rest is the encoded data set.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

_ATHERIS = __name__ == "__main__" and not {"--hypothesis", "--make-corpus", "--replay"} & set(
    sys.argv)
if _ATHERIS:  # coverage feedback: instrument the code under test before anything imports it
    import atheris

    with atheris.instrument_imports(include=["pydicom", "pynetdicom", "triage_agent"]):

        import triage_agent.ingest
        import triage_agent.preprocess
        import triage_agent.receiver
        import triage_agent.storage  # noqa: F401

from fuzz.common import (  # noqa: E402
    CT,
    MR,
    TRANSFER_SYNTAXES,
    base_dataset,
    encode_for,
    ts_flags,
)

CORPUS = HERE / "corpus" / "ingest"
FINDINGS = HERE / "findings" / "ingest"
FIXED_CLASS, FIXED_UID = CT, "1.2.826.0.1.3680043.8.498.77.1"


class Finding(AssertionError):
    """An oracle violation (not an expected rejection)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"[{stage}] {message}")
        self.stage = stage


def _remove_stale(parent: Path) -> None:
    """libFuzzer leaves with _exit (no atexit): remove work folders of processes now gone."""
    for d in parent.glob("fuzz-ingest-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


class FakeEvent:
    """Just enough of ``pynetdicom.events.Event`` for ``handle_store`` (C-STORE, not chunked)."""

    def __init__(self, data: bytes, ts: str, sop_class: str, sop_uid: str) -> None:
        from pydicom.uid import UID

        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="FUZZSCU  ",
                                                               address="127.0.0.1"))
        self.request = SimpleNamespace(AffectedSOPClassUID=sop_class,
                                       AffectedSOPInstanceUID=sop_uid,
                                       DataSet=io.BytesIO(data))
        self.context = SimpleNamespace(transfer_syntax=UID(ts))
        self._data = data

    @property
    def dataset(self) -> Any:  # mirrors pynetdicom.events.Event._get_dataset
        from pynetdicom.dsutils import decode

        t = self.context.transfer_syntax
        if not self._data:
            from pydicom.dataset import Dataset

            return Dataset()
        ds = decode(io.BytesIO(self._data), t.is_implicit_VR, t.is_little_endian, t.is_deflated)
        ds.set_original_encoding(t.is_implicit_VR, t.is_little_endian)
        return ds

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        assert not include_meta
        return self._data


def request_uids(data: bytes, ts: str) -> tuple[str, str]:
    """What a pynetdicom SCU would put in the request: the data set's own UIDs."""
    from pynetdicom.dsutils import decode

    implicit, little = ts_flags(ts)
    try:
        ds = decode(io.BytesIO(data), implicit, little)
        return str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - an SCU could not send it; use fixed UIDs instead
        return FIXED_CLASS, FIXED_UID


def _ui(value: str) -> str:
    """A UI value as the SCP reads it back from the command set (trailing NUL/space removed)."""
    return value.rstrip("\x00 ")


@dataclass
class IngestTarget:
    """Temp storage root + SQLite + a Receiver; ``run`` checks one input against the oracles."""

    base: Path | None = None
    preprocess: bool = True
    model_size: int = 128
    execs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    findings: dict[str, str] = field(default_factory=dict)
    record: bool = False  # record findings and go on (fuzz runs) instead of raising (tests)

    def __post_init__(self) -> None:
        from triage_agent import db
        from triage_agent.config import AgentConfig
        from triage_agent.receiver import Receiver
        from triage_agent.storage import Storage

        if self.base is None:
            shm = Path("/dev/shm")
            parent = shm if shm.is_dir() else Path(tempfile.gettempdir())
            _remove_stale(parent)
            self.base = Path(tempfile.mkdtemp(prefix=f"fuzz-ingest-{os.getpid()}-", dir=parent))
        self.base = Path(self.base)
        # watched/ holds the storage root two levels down, so a "../" escape lands in watched/
        self.watched = self.base / "watched"
        self.root = self.watched / "a" / "storage"
        self.scratch = self.base / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.db_path = self.base / "triage.db"
        url = f"sqlite:///{self.db_path}"
        db.upgrade(url)
        self.sessions = db.session_factory(db.make_engine(url))
        self.storage = Storage(self.root, high_water_percent=99.99)
        cfg = AgentConfig.model_validate({
            "storage": {"root": str(self.root), "extra_sop_classes": [MR],
                        "high_water_percent": 99.99},
            "database": {"url": url},
        })
        self.rx = Receiver(cfg, self.storage, self.sessions)
        self.outside_before = self._outside_files()
        self._cwd_before = set(os.listdir(os.getcwd()))

    # -------------------------------------------------------------------------------- oracles

    def _outside_files(self) -> set[str]:
        out = set()
        for dirpath, dirnames, filenames in os.walk(self.watched):
            if Path(dirpath) == self.root.parent:
                dirnames[:] = [d for d in dirnames if d != self.root.name]
            for name in filenames + dirnames:
                out.add(os.path.relpath(os.path.join(dirpath, name), self.watched))
        for name in os.listdir(self.base):
            if name not in ("watched", "scratch") and not name.startswith("triage.db"):
                out.add("../" + name)
        return out

    def check_tree(self) -> None:
        """Everything under the root is dicom/<20hex>/<20hex>/<64hex>.dcm, quarantine/<64hex>.dcm
        or the audit spool (audit-spool.jsonl, its lock files and its rewrite)."""
        import re

        ok = re.compile(r"^(dicom/[0-9a-f]{20}/[0-9a-f]{20}/[0-9a-f]{64}\.dcm|"
                        r"quarantine/[0-9a-f]{64}\.dcm|audit-spool\.jsonl(\.lock|\.replay\.lock|\.tmp)?)$")
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            if p.is_symlink():
                raise Finding("storage", f"symlink in storage: {rel}")
            if p.is_file() and not ok.match(rel):
                raise Finding("storage", f"unexpected file in storage: {rel}")

    def _check_side_effects(self) -> None:
        leftovers = os.listdir(self.storage.tmp_dir)
        if leftovers:
            for n in leftovers:
                (self.storage.tmp_dir / n).unlink(missing_ok=True)
            raise Finding("persist", f"temp files left in storage/tmp: {leftovers[:3]}")
        now = self._outside_files()
        new = now - self.outside_before
        if new:
            self.outside_before = now
            raise Finding("persist", f"files created outside the storage root: {sorted(new)[:5]}")
        cwd_new = set(os.listdir(os.getcwd())) - self._cwd_before
        cwd_new = {n for n in cwd_new if not n.startswith(("crash-", "leak-", "timeout-",
                                                           "oom-", "slow-unit-", ".hypothesis"))}
        if cwd_new:
            self._cwd_before |= cwd_new
            raise Finding("persist", f"files created in the working directory: {sorted(cwd_new)}")

    # ---------------------------------------------------------------------------------- run

    def run(self, data: bytes, ts: str, req_class: str | None = None,
            req_uid: str | None = None) -> str:
        self.execs += 1
        try:
            outcome = self._run(data, ts, req_class, req_uid)
        except Finding as f:
            if not self.record:
                raise
            self._record(f, data, ts, req_class, req_uid)
            outcome = "finding"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return outcome

    def _record(self, f: Finding, data: bytes, ts: str, rc: str | None, ru: str | None) -> None:
        tb = traceback.format_exc()
        cause = f.__cause__
        frames = traceback.extract_tb(cause.__traceback__) if cause else []
        where = next((f"{fr.filename.rsplit('/', 1)[-1]}:{fr.name}:{fr.lineno}"
                      for fr in reversed(frames)
                      if "triage_agent" in fr.filename), "")
        sig = f"{f.stage}|{type(cause).__name__ if cause else str(f)[:60]}|{where}"
        if sig in self.findings:
            return
        chain = ">".join(fr.name for fr in frames if "triage_agent" in fr.filename)
        self.findings[sig] = f"{f} @ {chain}"
        FINDINGS.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha1(sig.encode()).hexdigest()[:10]
        header = bytes([TRANSFER_SYNTAXES.index(ts) | (0 if rc is None else 4)])
        (FINDINGS / f"{h}.bin").write_bytes(header + data)
        (FINDINGS / f"{h}.txt").write_text(
            f"signature: {sig}\nts: {ts}\nrequest: {rc!r} {ru!r}\n\n{tb}")
        print(f"FINDING {h}: {sig}", file=sys.stderr, flush=True)

    def _run(self, data: bytes, ts: str, req_class: str | None, req_uid: str | None) -> str:
        from sqlalchemy import select

        from triage_agent import receiver
        from triage_agent.models import Instance

        if req_class is None or req_uid is None:
            c, u = request_uids(data, ts)
            req_class = c if req_class is None else req_class
            req_uid = u if req_uid is None else req_uid
        req_class, req_uid = _ui(req_class), _ui(req_uid)
        event = FakeEvent(data, ts, req_class, req_uid)
        try:
            result = receiver.handle_store(event, self.rx)
        except Exception as e:
            with contextlib.suppress(Finding):
                self._check_side_effects()
            raise Finding("handle_store", f"unhandled {type(e).__name__}: {e}") from e
        self._check_side_effects()
        if isinstance(result, int):
            status = result
        elif hasattr(result, "Status"):
            status = int(result.Status)
        else:
            raise Finding("handle_store", f"bad return value {result!r}")
        if status != receiver.Status.SUCCESS:
            return f"0x{status:04X}"
        with self.sessions() as s:
            row = s.execute(select(Instance.path, Instance.sha256)
                            .where(Instance.sop_instance_uid == req_uid)).one_or_none()
        if row is None:
            raise Finding("persist", "Success without an instance row")
        if req_class not in receiver.IMAGE_SOP_CLASSES:
            return "success-ignored"
        path = self._stored_file(data, ts, req_class, req_uid, row)
        if not self.preprocess:
            return "success"
        return self._preprocess(path)

    def _stored_file(self, data: bytes, ts: str, cls: str, uid: str, row: Any) -> Path:
        from triage_agent import ingest
        from triage_agent.storage import content_digest

        info = ingest.InstanceInfo(cls, uid, "", "", ts)
        digest = content_digest([ingest._file_preamble(info), data])
        # same UID, other content (e.g. first sent as an ignored class): ours is quarantined
        rel = row.path if row.sha256 == digest else self.storage.quarantine_relpath(digest)
        if rel is None:
            raise Finding("persist", "image instance recorded without a path")
        p = self.storage.abspath(rel)
        if not p.is_file():
            raise Finding("persist", f"Success but {rel} is missing")
        return p

    def _preprocess(self, p1: Path) -> str:
        from triage_agent.preprocess import PreprocessError, model_inputs, read_series

        paths = [p1, self._second_slice(p1)]
        try:
            vol = read_series(paths)
            model_inputs(vol, size=self.model_size)
        except PreprocessError:
            return "success-not-assessable"
        except Exception as e:
            raise Finding("preprocess", f"{type(e).__name__} is not a PreprocessError: "
                                        f"{str(e)[:200]}") from e
        finally:
            if paths[1] != p1:
                paths[1].unlink(missing_ok=True)
        return "success-preprocessed"

    def _second_slice(self, p1: Path) -> Path:
        """The stored slice moved 5 mm along z (so read_series gets a 2-slice volume), written
        by the harness outside the storage root; falls back to the same file twice."""
        import pydicom

        try:
            ds = pydicom.dcmread(p1)
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 5.0]
            ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.88.2"
            out = self.scratch / "second.dcm"
            ds.save_as(out)
            return out
        except Exception:  # noqa: BLE001 - harness-side; the file may be too broken to edit
            return p1

    def close(self) -> None:
        assert self.base is not None
        shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------------ corpus

def make_corpus(out: Path = CORPUS, synth: bool = True) -> int:
    """Seeds: make_series slices, triage_model.synth + synth_dicom slices (small matrices), the base
    dataset, a non-CT instance, each encoded in every transfer syntax."""
    import pydicom

    sys.path.insert(0, str(HERE.parent))
    from tests.factories import make_series

    out.mkdir(parents=True, exist_ok=True)
    seeds = [base_dataset(0), base_dataset(1, size=16), base_dataset(2, sop_class=MR)]
    with tempfile.TemporaryDirectory() as tmp:
        for p in make_series(Path(tmp) / "f", n=2, size=16, seed=3):
            seeds.append(pydicom.dcmread(p))
        for p in make_series(Path(tmp) / "m", n=1, size=8, seed=4, modality="MR"):
            seeds.append(pydicom.dcmread(p))
        try:
            if not synth:
                raise RuntimeError("not asked for")
            from triage_model.synth import make_case

            from triage_agent.synth_dicom import write_case_dicom

            case = make_case(1, "intraparenchymal_haemorrhage", matrix=32)
            for p in write_case_dicom(case, Path(tmp) / "s", write_mask=False)[10:12]:
                seeds.append(pydicom.dcmread(p))
        except Exception as e:  # noqa: BLE001
            print(f"synth seeds skipped: {e}", file=sys.stderr)
    n = 0
    for i, ds in enumerate(seeds):
        if hasattr(ds, "file_meta"):
            del ds.file_meta
        for t, ts in enumerate(TRANSFER_SYNTAXES):
            data = encode_for(ds, ts)
            if data is None:
                continue
            (out / f"seed{i:02d}_ts{t}.bin").write_bytes(bytes([t]) + data)
            n += 1
    return n


def decode_input(buf: bytes) -> tuple[bytes, str, str | None, str | None]:
    head = buf[0]
    ts = TRANSFER_SYNTAXES[head & 3]
    if head & 4:
        return buf[1:], ts, FIXED_CLASS, FIXED_UID
    return buf[1:], ts, None, None


# --------------------------------------------------------------------------------- runners

def _quiet() -> None:
    logging.basicConfig(level=logging.CRITICAL)
    for name in ("", "pydicom", "pynetdicom", "triage_agent"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    import warnings

    warnings.simplefilter("ignore")


def _limit_memory(gib: float) -> None:
    lim = int(gib * 2**30)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))


def run_atheris(argv: list[str]) -> int:
    import atheris

    _quiet()
    target = IngestTarget(record=True)
    started = time.monotonic()

    def one(buf: bytes) -> None:
        if len(buf) < 2:
            return
        target.run(*decode_input(buf))
        if target.execs % 500 == 0:  # libFuzzer exits with _exit: keep the figures on disk
            write_status("atheris", target, time.monotonic() - started)

    import atexit

    def summary() -> None:
        summarize("atheris", target, time.monotonic() - started)
        target.close()

    atexit.register(summary)
    if not any(not a.startswith("-") for a in argv[1:]):
        if not CORPUS.is_dir() or not any(CORPUS.iterdir()):
            make_corpus()
        argv = [*argv, str(CORPUS)]
    if not any(a.startswith("-rss_limit_mb") for a in argv):
        argv.append("-rss_limit_mb=6144")
    if not any(a.startswith("-max_len") for a in argv):
        argv.append("-max_len=65536")
    atheris.Setup(argv, one)
    atheris.Fuzz()
    return 0


def run_hypothesis(minutes: float, batch: int = 200, seed: int | None = None) -> IngestTarget:
    from hypothesis import HealthCheck, Phase, given, settings

    from fuzz.common import store_input

    _quiet()
    target = IngestTarget(record=True)
    deadline = time.monotonic() + minutes * 60
    started = time.monotonic()
    rnd = seed if seed is not None else int.from_bytes(os.urandom(4), "little")

    @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(store_input())
    def case(inp: tuple[bytes, str, str | None, str | None]) -> None:
        if time.monotonic() < deadline:
            target.run(*inp)

    from hypothesis import seed as hseed

    k = 0
    while time.monotonic() < deadline:
        hseed(rnd + k)(case)()
        k += 1
        if k % 10 == 0:
            target.check_tree()
    target.check_tree()
    summarize("hypothesis", target, time.monotonic() - started)
    return target


def write_status(mode: str, target: IngestTarget, seconds: float) -> None:
    FINDINGS.mkdir(parents=True, exist_ok=True)
    (FINDINGS.parent / f"ingest-{mode}-status.json").write_text(json.dumps(
        _summary(mode, target, seconds), indent=1))


def _summary(mode: str, target: IngestTarget, seconds: float) -> dict[str, Any]:
    return {"harness": "fuzz_ingest", "mode": mode, "executions": target.execs,
            "seconds": round(seconds, 1), "findings": len(target.findings),
            "finding_signatures": sorted(target.findings), "outcomes": target.outcomes}


def summarize(mode: str, target: IngestTarget, seconds: float) -> None:
    write_status(mode, target, seconds)
    rec = {"harness": "fuzz_ingest", "mode": mode, "executions": target.execs,
           "seconds": round(seconds, 1), "findings": len(target.findings),
           "finding_signatures": sorted(target.findings), "outcomes": target.outcomes}
    print("SUMMARY " + json.dumps(rec), file=sys.stderr, flush=True)


def main() -> int:
    if "--hypothesis" not in sys.argv and "--make-corpus" not in sys.argv and \
            "--replay" not in sys.argv:
        _limit_memory(8)
        return run_atheris(sys.argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--hypothesis", action="store_true")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--make-corpus", action="store_true")
    ap.add_argument("--replay", nargs="*")
    ap.add_argument("--seed", type=int)
    args = ap.parse_args()
    _limit_memory(8)
    if args.make_corpus:
        print(f"{make_corpus()} seed inputs in {CORPUS}")
        return 0
    if args.replay:
        _quiet()
        target = IngestTarget()
        try:
            for f in args.replay:
                try:
                    print(f, target.run(*decode_input(Path(f).read_bytes())))
                except Finding as e:
                    traceback.print_exc()
                    print(f, "FINDING", e)
        finally:
            target.close()
        return 0
    target = run_hypothesis(args.minutes, seed=args.seed)
    target.close()
    return 1 if target.findings else 0


if __name__ == "__main__":
    sys.exit(main())
