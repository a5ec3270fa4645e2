"""Fuzz harness smoke runs (bounded, derandomized) and regression tests for what the fuzzers found.

The long runs live in ``fuzz/`` (see fuzz/README.md); these keep the harnesses working in CI and
pin every crash they found. A regression test for a bug not yet fixed is ``xfail(strict=True)``:
the fix makes it pass, strict makes that fail until the marker is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from pydicom.uid import ExplicitVRLittleEndian

from fuzz.common import CT, MR, base_dataset, encode_for, store_input
from fuzz.fuzz_ingest import IngestTarget

REPO = Path(__file__).resolve().parent.parent

SMOKE = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck), phases=[Phase.generate])


@pytest.fixture(scope="module")
def ingest() -> Iterator[IngestTarget]:
    """Records findings and goes on (smoke runs)."""
    t = IngestTarget(record=True)
    yield t
    t.close()


@pytest.fixture(scope="module")
def strict_ingest() -> Iterator[IngestTarget]:
    """Raises Finding (regression tests)."""
    t = IngestTarget(record=False)
    yield t
    t.close()


# ------------------------------------------------------------------------------ smoke runs


def test_ingest_hypothesis_smoke(ingest: IngestTarget) -> None:
    """50 drawn C-STORE inputs through handle_store -> persist -> read_series/model_inputs."""

    @SMOKE
    @given(store_input())
    def run(inp: tuple[bytes, str, str | None, str | None]) -> None:
        ingest.run(*inp)

    before = ingest.execs
    run()
    ingest.check_tree()
    assert not ingest.findings, ingest.findings
    assert ingest.execs - before == 50
    assert not os.listdir(ingest.storage.tmp_dir)


def test_ingest_corpus_seeds_are_accepted(ingest: IngestTarget) -> None:
    """The seed inputs are valid: Success in every transfer syntax, and the real-size slices
    reach model_inputs (guards the harness against silently rejecting everything)."""
    from fuzz.common import TRANSFER_SYNTAXES

    for ts in TRANSFER_SYNTAXES:
        ds = base_dataset(10, size=16)
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.10.{TRANSFER_SYNTAXES.index(ts)}"
        assert ingest.run(encode_for(ds, ts) or b"", ts).startswith("success"), ts
    ds = base_dataset(11, sop_class=MR)
    assert ingest.run(encode_for(ds, ExplicitVRLittleEndian) or b"",
                      ExplicitVRLittleEndian) == "success-ignored"


def test_atheris_entry_runs(tmp_path: Path) -> None:
    """The libFuzzer entry point starts, loads a seed corpus and runs (atheris is a dev
    dependency on Linux x86-64, CPython < 3.14; skipped where it has no wheel)."""
    pytest.importorskip("atheris")
    from fuzz.fuzz_ingest import make_corpus

    assert make_corpus(tmp_path / "corpus", synth=False) >= 20
    r = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "fuzz_ingest.py"), "-runs=100", "-seed=1",
         str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert "Done 100 runs" in r.stderr or "DONE" in r.stderr, r.stderr[-3000:]


def test_network_hypothesis_smoke(tmp_path: Path) -> None:
    """A node subprocess: 10 drawn data sets via a pynetdicom SCU and 20 raw PDU cases, each
    followed by the liveness / storage-root / tmp / log / ledger checks."""
    from fuzz.fuzz_network import NetworkTarget, raw_case

    target = NetworkTarget(base=tmp_path / "net", reply_wait_s=0.3)
    try:
        @settings(SMOKE, max_examples=10)
        @given(store_input())
        def datasets(inp: tuple[bytes, str, str | None, str | None]) -> None:
            target.run("dataset", inp)

        @settings(SMOKE, max_examples=20)
        @given(raw_case())
        def raw(case: dict) -> None:
            case["hold_s"] = min(case["hold_s"], 0.1)
            target.run("raw", case)

        datasets()
        raw()
        target.check(full=True)
        target.same_address_echo()
        assert not target.findings, target.findings
        assert target.execs == 30
    finally:
        target.node.kill()  # a graceful SIGTERM drain takes ~9 s; not what this test is about


# ------------------------------------------------------------------------- regressions
# Found by fuzz_ingest (atheris and hypothesis): a stored CT slice whose numeric header values
# do not parse makes preprocess.read_series raise ValueError/TypeError, not PreprocessError. The
# worker then treats the job as a transient failure (retries, then dead-letters) instead of
# "not assessable", and stores the raw header text in the job's error column.

def _patched(old: bytes, new: bytes, ts: str = ExplicitVRLittleEndian, i: int = 20) -> bytes:
    ds = base_dataset(i, size=16)
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{i}.{abs(hash(new)) % 10**6}"
    data = encode_for(ds, ts)
    assert data is not None and data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


MALFORMED = {
    "ImageOrientationPatient": (b"1.0\\0.0\\0.0\\0.0\\1.0\\0.0", b"1.0\\0.0\\0.0\\0.0\\1.0\\0.x"),
    "PixelSpacing": (b"0.5\\0.5 ", b"0#5\\0.5 "),
    "ImagePositionPatient": (b"-2.0\\-2.0\\0.0 ", b"-2.0\\-2.0\\0..0"),
    "RescaleIntercept": (b"-1024.0 ", b"-10x4.0 "),
}


@pytest.mark.parametrize("element", sorted(MALFORMED))
def test_regression_non_numeric_ds_is_a_preprocess_error(strict_ingest: IngestTarget,
                                                         element: str) -> None:
    old, new = MALFORMED[element]
    outcome = strict_ingest.run(_patched(old, new), ExplicitVRLittleEndian)
    assert outcome == "success-not-assessable"


# Value multiplicity the reader does not expect: one value where a vector belongs (not
# iterable / no len()), several where a scalar belongs (float() of a MultiValue).
WRONG_VM = {
    "ImageOrientationPatient": 1.0,
    "PixelSpacing": 0.5,
    "ImagePositionPatient": 0.0,
    "RescaleSlope": [1, 1],
    "RescaleIntercept": [-1024, 0],
}


@pytest.mark.parametrize("element", sorted(WRONG_VM))
def test_regression_wrong_value_multiplicity_is_a_preprocess_error(
        strict_ingest: IngestTarget, element: str) -> None:
    ds = base_dataset(50 + sorted(WRONG_VM).index(element), size=16)
    setattr(ds, element, WRONG_VM[element])
    data = encode_for(ds, ExplicitVRLittleEndian)
    assert data is not None
    assert strict_ingest.run(data, ExplicitVRLittleEndian) == "success-not-assessable"


def test_regression_orientation_wrong_vr_is_a_preprocess_error(
        strict_ingest: IngestTarget) -> None:
    ds = base_dataset(30, size=16)
    del ds.ImageOrientationPatient
    ds.add_new(0x00200037, "US", 1)  # explicit VR: read back as the int 1
    data = encode_for(ds, ExplicitVRLittleEndian)
    assert data is not None
    assert strict_ingest.run(data, ExplicitVRLittleEndian) == "success-not-assessable"


def test_same_uid_first_ignored_class_then_ct_is_quarantined(
        strict_ingest: IngestTarget) -> None:
    """Harness oracle case found by atheris: an instance UID first stored as an ignored SOP
    class (no file) and then sent as CT gets Success, the CT copy quarantined (promise 3)."""
    ds = base_dataset(40, size=16, sop_class=MR)
    assert strict_ingest.run(encode_for(ds, ExplicitVRLittleEndian) or b"",
                             ExplicitVRLittleEndian) == "success-ignored"
    ds.SOPClassUID = CT
    out = strict_ingest.run(encode_for(ds, ExplicitVRLittleEndian) or b"", ExplicitVRLittleEndian)
    assert out.startswith("success"), out
    assert list((strict_ingest.root / "quarantine").iterdir())
