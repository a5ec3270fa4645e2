"""The fast inference path scores like the reference path (triage_model.runtime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triage_model.checkpoint import Detector, make_checkpoint
from triage_model.network import NetConfig, UNetEnsemble, build_network
from triage_model.runtime import (
    FAST_BATCH,
    LEAN_PASSES,
    PassPlan,
    PlanReconstruction,
    fast_reconstruction,
    onnxruntime_available,
    reference_reconstruction,
)
from triage_model.scoring import ScoringConfig

SIZE = 32


def _tiny_ensemble(seed: int = 0, members: int = 2) -> UNetEnsemble:
    torch.manual_seed(seed)
    member = NetConfig(input_size=SIZE, base_channels=4, max_channels=8, arch="unet",
                       unet_levels=2).to_dict()
    net = UNetEnsemble(NetConfig(input_size=SIZE, arch="ensemble", members=(member,) * members))
    with torch.no_grad():  # GroupNorm's affine parameters away from (1, 0), like trained ones
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _slices(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, SIZE, SIZE), dtype=np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    brain = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 3) ** 2)
    return x, np.broadcast_to(brain, x.shape).copy()


ENGINES = ["torch", pytest.param("onnxruntime", marks=pytest.mark.skipif(
    not onnxruntime_available(), reason="onnxruntime not installed"))]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flip_tta", [True, False])
def test_fast_reconstruction_matches_reference(engine: str, flip_tta: bool) -> None:
    net = _tiny_ensemble()
    x = torch.rand(FAST_BATCH * 2 + 3, 1, SIZE, SIZE)  # several sub-batches and a short one
    fast, used = fast_reconstruction(net, flip_tta, torch.device("cpu"), threads=1, engine=engine)
    assert used == engine
    with torch.inference_mode():
        ref = reference_reconstruction(net, flip_tta)(x)
        got = fast(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-4
    if flip_tta:  # the mirrored view really enters: without it the output differs
        with torch.inference_mode():
            plain = net(x, sample=False, decode=True).recon
        assert float((got - plain).abs().max()) > 1e-3


def test_fast_detector_scores_like_reference() -> None:
    net = _tiny_ensemble(3)
    ck = make_checkpoint("dae", net=net, scoring=ScoringConfig(flip_tta=True, rec_q=0.05),
                         thresholds={"max": 1.0})
    x, brain = _slices(21)
    ref = Detector(ck, device="cpu").score(x, brain, batch_size=16)
    fast_det = Detector(ck, device="cpu", runtime="fast")
    got = fast_det.score(x, brain, batch_size=16)
    assert fast_det.engine in ("torch", "onnxruntime")
    np.testing.assert_allclose(got.score, ref.score, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.heatmap, ref.heatmap, atol=1e-4, rtol=0)
    assert np.ptp(ref.score) > 1e-3  # the slices score differently: the comparison means something


def test_unknown_runtime_is_refused() -> None:
    ck = make_checkpoint("dae", net=_tiny_ensemble())
    with pytest.raises(ValueError, match="runtime must be one of"):
        Detector(ck, device="cpu", runtime="turbo")


def _member_views(net: UNetEnsemble, run) -> list[int]:  # noqa: ANN001
    """Slices each ensemble member processed while ``run()`` ran."""
    seen = [0] * len(net.members)
    hooks = [m.register_forward_hook(lambda _m, inp, _out, i=i: seen.__setitem__(
        i, seen[i] + inp[0].shape[0])) for i, m in enumerate(net.members)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("engine", ENGINES)
def test_lean_path_runs_its_plan_on_either_engine(engine: str) -> None:
    net = _tiny_ensemble(5, members=4)
    x = torch.rand(FAST_BATCH + 5, 1, SIZE, SIZE)
    plan = PlanReconstruction(net.members, LEAN_PASSES).eval()
    with torch.inference_mode():
        views = _member_views(net, lambda: plan(x))
        expected = plan(x)
        full = reference_reconstruction(net, True)(x)
    n = x.shape[0]
    assert views == [n * ((i in LEAN_PASSES.plain) + (i in LEAN_PASSES.mirrored))
                     for i in range(4)]
    assert sum(views) < 8 * n  # fewer passes than the reference path's eight per slice
    lean, used = fast_reconstruction(net, True, torch.device("cpu"), threads=1, engine=engine,
                                     plan=LEAN_PASSES)
    assert used == engine
    with torch.inference_mode():
        got = lean(x)
    assert float((got - expected).abs().max()) < 1e-4
    assert float((got - full).abs().max()) > 1e-4  # not the full reconstruction


def test_plan_mean_of_its_outputs() -> None:
    net = _tiny_ensemble(6, members=3)
    x = torch.rand(4, 1, SIZE, SIZE)
    with torch.inference_mode():
        got = PlanReconstruction(net.members, PassPlan(plain=(0, 2), mirrored=(1,)))(x)
        m = net.members
        want = (m[0](x).recon + m[2](x).recon + m[1](x.flip(-1)).recon.flip(-1)) / 3
    assert float((got - want).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="selects none"):
        PlanReconstruction(net.members, PassPlan(plain=(7,), mirrored=()))


def test_lean_detector_on_a_single_network_is_the_fast_path() -> None:
    torch.manual_seed(2)
    net = build_network(NetConfig(input_size=SIZE, base_channels=4, max_channels=8, arch="unet",
                                  unet_levels=2)).eval()
    ck = make_checkpoint("dae", net=net, scoring=ScoringConfig(flip_tta=True, rec_q=0.05),
                         thresholds={"max": 1.0})
    x, brain = _slices(9)
    ref = Detector(ck, device="cpu").score(x, brain)
    got = Detector(ck, device="cpu", runtime="lean").score(x, brain)
    np.testing.assert_allclose(got.score, ref.score, atol=1e-4, rtol=0)


def test_lean_detector_scores_with_its_plan() -> None:
    net = _tiny_ensemble(7, members=4)
    ck = make_checkpoint("dae", net=net, scoring=ScoringConfig(flip_tta=True, rec_q=0.05),
                         thresholds={"max": 1.0})
    x, brain = _slices(12)
    ref = Detector(ck, device="cpu").score(x, brain)
    det = Detector(ck, device="cpu", runtime="lean")
    got = det.score(x, brain)
    assert det.engine in ("torch", "onnxruntime")
    plan_det = Detector(ck, device="cpu")  # the plan's passes one by one, in PyTorch
    plan = PlanReconstruction(net.members, LEAN_PASSES).eval()
    plan_det._reconstruct, plan_det.engine = plan, "torch"
    want = plan_det.score(x, brain)
    np.testing.assert_allclose(got.score, want.score, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.heatmap, want.heatmap, atol=1e-4, rtol=0)
    assert float(np.abs(got.score - ref.score).max()) > 1e-3  # fewer passes: other scores
