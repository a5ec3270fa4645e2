"""How the detector runs its network: the reference path and the fast path.

Both give the same reconstruction; they differ only in float summation order (max absolute
difference of the order of 1e-6 on [0, 1] images; ``tests/test_fast_path.py`` holds them to
1e-4 on the scores).

* ``reference``: one forward pass per test-time view, in PyTorch's default (NCHW) layout.
* ``fast``: both views of the left-right flip test-time augmentation in one batch (at most
  ``FAST_BATCH`` slices per network call), run by ONNX Runtime when it is installed (the network
  exported once, in memory, when the detector first scores; ONNX Runtime fuses each convolution
  with its bias and runs in blocked layouts), otherwise by PyTorch in channels-last layout. On a
  GPU the fast path is PyTorch with the views batched.

``lean`` is not the same reconstruction: on an ensemble it runs fewer network passes
(``LEAN_PASSES``: which members see the slice and which its mirror image) on the fast path's
engine and averages those outputs. Its scores differ from the reference path's beyond float
rounding, so it is an option, chosen with its accuracy measured (docs/experiments.md); on a
single network it is the fast path.

``python bench/model.py --paths-only`` times the paths side by side on the same slices.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

RUNTIMES = ("reference", "fast", "lean")
#: slices per network call on the fast path (each call holds twice as many views with flip TTA)
FAST_BATCH = 32


@dataclass(frozen=True)
class PassPlan:
    """The network passes of an ensemble's reconstruction: the members that see the slice
    (``plain``) and those that see its mirror image (``mirrored``, mirrored back); the
    reconstruction is the mean of those outputs. Indices past the ensemble's size are ignored."""

    plain: tuple[int, ...]
    mirrored: tuple[int, ...]

    def passes(self, n_members: int) -> int:
        return sum(i < n_members for i in self.plain) + sum(i < n_members for i in self.mirrored)


#: the ``lean`` runtime's passes (see docs/experiments.md for how they were chosen)
LEAN_PASSES = PassPlan(plain=(0, 1, 2), mirrored=(0, 2))

Reconstruct = Callable[[torch.Tensor], torch.Tensor]


class TTAReconstruction(nn.Module):
    """The reconstruction that scoring uses: the network's output for (B,1,S,S) slices, or with
    ``flip_tta`` the mean of it and of the mirrored slices' output mirrored back, both views in
    one batch."""

    def __init__(self, net: nn.Module, flip_tta: bool) -> None:
        super().__init__()
        self.net, self.flip_tta = net, bool(flip_tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flip_tta:
            return self.net(x, sample=False, decode=True).recon
        b = x.shape[0]
        r = self.net(torch.cat([x, x.flip(-1)]), sample=False, decode=True).recon
        return 0.5 * (r[:b] + r[b:].flip(-1))


class PlanReconstruction(nn.Module):
    """An ensemble's reconstruction from the passes of a ``PassPlan``: the mean of the chosen
    members' outputs for (B,1,S,S) slices and for their mirror images (mirrored back). A member
    that sees both views gets them in one batch."""

    def __init__(self, members: nn.ModuleList, plan: PassPlan) -> None:
        super().__init__()
        n = len(members)
        self.members = members
        self.plain = [i for i in range(n) if i in plan.plain]
        self.mirrored = [i for i in range(n) if i in plan.mirrored]
        if not self.plain and not self.mirrored:
            raise ValueError(f"pass plan {plan} selects none of the {n} members")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        outs = []
        for i, m in enumerate(self.members):
            if i in self.plain and i in self.mirrored:
                r = m(torch.cat([x, x.flip(-1)])).recon
                outs += [r[:b], r[b:].flip(-1)]
            elif i in self.plain:
                outs.append(m(x).recon)
            elif i in self.mirrored:
                outs.append(m(x.flip(-1)).recon.flip(-1))
        return torch.stack(outs).mean(0)


def lean_module(net: nn.Module, flip_tta: bool, plan: PassPlan = LEAN_PASSES) -> nn.Module:
    """The ``lean`` reconstruction of ``net`` as a module of (B,1,S,S) slices: ``plan``'s passes
    on an ensemble (its mirrored passes only with ``flip_tta``), else the fast path's."""
    members = getattr(net, "members", None)
    if not isinstance(members, nn.ModuleList):
        return TTAReconstruction(net, flip_tta)
    return PlanReconstruction(members, plan if flip_tta else PassPlan(plan.plain, ()))


def reference_reconstruction(net: nn.Module, flip_tta: bool) -> Reconstruct:
    """One pass per view, as the detector was calibrated with."""

    def run(x1: torch.Tensor) -> torch.Tensor:
        recon = net(x1, sample=False, decode=True).recon
        if flip_tta:
            mirrored = net(x1.flip(-1), sample=False, decode=True).recon
            recon = 0.5 * (recon + mirrored.flip(-1))
        return recon

    return run


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def fast_reconstruction(net: nn.Module, flip_tta: bool, device: torch.device,
                        threads: int | None = None, engine: str = "auto",
                        plan: PassPlan | None = None) -> tuple[Reconstruct, str]:
    """(the fast path's reconstruction function, the engine it runs on: ``"onnxruntime"`` or
    ``"torch"``). ``engine="auto"``: ONNX Runtime on CPU when installed; ``threads``: its
    intra-op threads (default: ``torch.get_num_threads()``); ``plan``: the ``lean`` runtime's
    passes (``lean_module``) instead of all of them."""
    if engine not in ("auto", "onnxruntime", "torch"):
        raise ValueError(f"engine must be 'auto', 'onnxruntime' or 'torch', got {engine!r}")
    use_ort = device.type == "cpu" and (engine == "onnxruntime" or
                                        (engine == "auto" and onnxruntime_available()))
    if use_ort:
        try:
            return _ort_reconstruction(_module(net, flip_tta, plan), net, threads), "onnxruntime"
        except Exception as e:  # noqa: BLE001 - any export/session failure: fall back to torch
            if engine == "onnxruntime":
                raise
            log.warning("ONNX Runtime unavailable for this network (%s: %s); fast path runs in "
                        "PyTorch", type(e).__name__, e)
    return _torch_reconstruction(_module(net, flip_tta, plan), device), "torch"


def _module(net: nn.Module, flip_tta: bool, plan: PassPlan | None) -> nn.Module:
    mod = TTAReconstruction(net, flip_tta) if plan is None else lean_module(net, flip_tta, plan)
    return mod.eval()


def _split(run: Callable[[torch.Tensor], torch.Tensor]) -> Reconstruct:
    def split(x1: torch.Tensor) -> torch.Tensor:
        if x1.shape[0] <= FAST_BATCH:
            return run(x1)
        return torch.cat([run(x1[i:i + FAST_BATCH]) for i in range(0, x1.shape[0], FAST_BATCH)])

    return split


def _torch_reconstruction(tta: nn.Module, device: torch.device) -> Reconstruct:
    if device.type != "cpu":
        return tta
    tta = tta.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def run(x1: torch.Tensor) -> torch.Tensor:
        return tta(x1.contiguous(memory_format=torch.channels_last)).contiguous()

    return _split(run)


def _ort_reconstruction(tta: nn.Module, net: nn.Module, threads: int | None) -> Reconstruct:
    import onnxruntime as ort

    size = int(getattr(getattr(net, "cfg", None), "input_size", 128))
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(tta, (torch.zeros(2, 1, size, size),), buf,  # type: ignore[arg-type]
                          input_names=["x"],
                          output_names=["recon"], dynamic_axes={"x": {0: "b"}, "recon": {0: "b"}},
                          opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # idle pool threads sleep instead of spinning: several scoring workers share the cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess: Any = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])

    def run(x1: torch.Tensor) -> torch.Tensor:
        x = x1.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(sess.run(None, {"x": x})[0])

    return _split(run)
