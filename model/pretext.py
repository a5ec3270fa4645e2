"""Self-supervised pretext tasks: context-restoration patch swap and the 20 geometric transforms.

Pure tensor code. Randomness only through an explicit ``torch.Generator`` (never the global RNG),
so training is reproducible and resumable.

Geometric transforms (Venkatakrishnan, Kim et al. 2020): label ``t = 5 * k + s`` with ``k`` the
number of counter-clockwise quarter turns (0..3, ``torch.rot90`` on the last two axes) and ``s``
the shift (0 none, 1 up, 2 down, 3 left, 4 right) by ``size // 8`` pixels, applied after the
rotation. The shift is a cyclic roll, so every transform is an exact permutation of pixels with an
exact inverse; the content that wraps round is background for a centred head.

Context restoration (Chen et al. 2019, as used by the seed paper): pairs of square patches of side
``size // 8`` centred on points sampled inside the head are swapped; the network is trained to
restore the original image.
"""

from __future__ import annotations

import torch

N_ROTATIONS = 4
SHIFT_NAMES = ("none", "up", "down", "left", "right")
N_SHIFTS = len(SHIFT_NAMES)
N_TRANSFORMS = N_ROTATIONS * N_SHIFTS
# (dy, dx) in units of the shift step; "up" moves content towards row 0.
_SHIFT_DIRS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


def transform_params(label: int) -> tuple[int, int, int]:
    """label -> (quarter turns k, dy, dx) with dy/dx in {-1, 0, 1} shift steps."""
    if not 0 <= label < N_TRANSFORMS:
        raise ValueError(f"transform label must be in [0, {N_TRANSFORMS}), got {label}")
    k, s = divmod(int(label), N_SHIFTS)
    dy, dx = _SHIFT_DIRS[s]
    return k, dy, dx


def transform_name(label: int) -> str:
    k, s = divmod(int(label), N_SHIFTS)
    return f"rot{90 * k}-{SHIFT_NAMES[s]}"


def default_shift(size: int) -> int:
    return max(1, size // 8)


def apply_transform(x: torch.Tensor, label: int, shift: int | None = None) -> torch.Tensor:
    """Apply transform ``label`` to the last two axes (square images)."""
    k, dy, dx = transform_params(label)
    step = default_shift(x.shape[-1]) if shift is None else shift
    y = torch.rot90(x, k, dims=(-2, -1)) if k else x
    if dy or dx:
        y = torch.roll(y, shifts=(dy * step, dx * step), dims=(-2, -1))
    return y


def invert_transform(y: torch.Tensor, label: int, shift: int | None = None) -> torch.Tensor:
    """Exact inverse of :func:`apply_transform`."""
    k, dy, dx = transform_params(label)
    step = default_shift(y.shape[-1]) if shift is None else shift
    x = torch.roll(y, shifts=(-dy * step, -dx * step), dims=(-2, -1)) if (dy or dx) else y
    return torch.rot90(x, -k, dims=(-2, -1)) if k else x


def apply_transforms(x: torch.Tensor, labels: torch.Tensor, shift: int | None = None) -> torch.Tensor:
    """Per-sample transforms: ``x`` (B,...,S,S), ``labels`` (B,) -> transformed (B,...,S,S)."""
    out = torch.empty_like(x)
    lab = labels.to("cpu")
    for t in torch.unique(lab).tolist():
        idx = (lab == t).nonzero(as_tuple=True)[0].to(x.device)
        out[idx] = apply_transform(x[idx], int(t), shift)
    return out


def all_transforms(x: torch.Tensor, shift: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every transform of every sample: (B,...) -> (20*B,...) ordered transform-major, + labels."""
    views = [apply_transform(x, t, shift) for t in range(N_TRANSFORMS)]
    labels = torch.arange(N_TRANSFORMS).repeat_interleave(x.shape[0])
    return torch.cat(views, 0), labels


def random_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, N_TRANSFORMS, (n,), generator=generator)


# ---------------------------------------------------------------------------- context restoration


def _candidate_points(mask: torch.Tensor) -> torch.Tensor:
    """(y, x) of the True pixels of a 2-D mask (every pixel if the mask is empty)."""
    pts = mask.nonzero()
    if len(pts) == 0:
        h, w = mask.shape
        pts = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
        pts = pts.reshape(-1, 2)
    return pts


def _sample_centres(pts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n points drawn uniformly (with replacement) from ``pts``."""
    idx = torch.randint(0, len(pts), (n,), generator=generator)
    return pts[idx]


def swap_boxes(size: int, patch: int, centres: torch.Tensor) -> list[tuple[int, int]]:
    """Top-left corners of patches centred on ``centres``, clamped to lie inside the image."""
    half = patch // 2
    out = []
    for y, x in centres.tolist():
        y0 = min(max(int(y) - half, 0), size - patch)
        x0 = min(max(int(x) - half, 0), size - patch)
        out.append((y0, x0))
    return out


def _overlap(a: tuple[int, int], b: tuple[int, int], patch: int) -> bool:
    return abs(a[0] - b[0]) < patch and abs(a[1] - b[1]) < patch


def patch_swap(
    x: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    n_swaps: int = 4,
    patch: int | None = None,
    max_tries: int = 20,
) -> tuple[torch.Tensor, list[list[tuple[tuple[int, int], tuple[int, int]]]]]:
    """Context-restoration corruption of a batch.

    ``x`` (B,S,S) or (B,1,S,S); ``mask`` the head/brain mask, same leading shape, bool. For each
    image, ``n_swaps`` times: two centres are sampled inside the mask, the two non-overlapping
    ``patch`` x ``patch`` squares around them are exchanged (pairs that would overlap are redrawn;
    after ``max_tries`` the swap is skipped). Returns the corrupted copy and, per image, the list
    of swapped box pairs (top-left corners), which makes the corruption checkable exactly.
    """
    squeeze = x.dim() == 4
    xs = x[:, 0] if squeeze else x
    ms = mask[:, 0] if mask.dim() == 4 else mask
    size = xs.shape[-1]
    p = default_shift(size) if patch is None else patch
    out = xs.clone()
    record: list[list[tuple[tuple[int, int], tuple[int, int]]]] = []
    for b in range(xs.shape[0]):
        pts = _candidate_points(ms[b].to("cpu", torch.bool))
        pairs = []
        for _ in range(n_swaps):
            for _ in range(max_tries):
                a, c = swap_boxes(size, p, _sample_centres(pts, 2, generator))
                if not _overlap(a, c, p):
                    break
            else:
                continue
            pa = out[b, a[0]:a[0] + p, a[1]:a[1] + p].clone()
            out[b, a[0]:a[0] + p, a[1]:a[1] + p] = out[b, c[0]:c[0] + p, c[1]:c[1] + p]
            out[b, c[0]:c[0] + p, c[1]:c[1] + p] = pa
            pairs.append((a, c))
        record.append(pairs)
    return (out.unsqueeze(1) if squeeze else out), record


def context_encoding_noise(
    x: torch.Tensor, generator: torch.Generator, max_boxes: int = 3, max_frac: float = 0.5
) -> torch.Tensor:
    """ceVAE corruption (Zimmerer et al. 2019, MOOD defaults): 0-3 random rectangles of side up to
    ``max_frac`` of the image, each filled with one uniform value in [min, max] of the image."""
    squeeze = x.dim() == 4
    xs = (x[:, 0] if squeeze else x).clone()
    size = xs.shape[-1]
    for b in range(xs.shape[0]):
        lo, hi = float(xs[b].min()), float(xs[b].max())
        n = int(torch.randint(0, max_boxes + 1, (1,), generator=generator))
        for _ in range(n):
            hw = torch.randint(4, max(5, int(size * max_frac)), (2,), generator=generator)
            y0 = int(torch.randint(0, size - int(hw[0]) + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, size - int(hw[1]) + 1, (1,), generator=generator))
            v = lo + (hi - lo) * float(torch.rand(1, generator=generator))
            xs[b, y0:y0 + int(hw[0]), x0:x0 + int(hw[1])] = v
    return xs.unsqueeze(1) if squeeze else xs


def coarse_noise(x: torch.Tensor, generator: torch.Generator, resolution: int = 16,
                 std: float = 0.2, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising-autoencoder corruption (Kascenas et al. 2022): Gaussian noise drawn on a coarse
    ``resolution`` x ``resolution`` grid, bilinearly upsampled to the image and added (inside
    ``mask`` when given). Coarse noise makes the network restore blob-sized intensity changes,
    the scale of lesions, rather than pixel noise. (B,S,S) or (B,1,S,S) in, same shape out.
    The noise is drawn on ``generator``'s device (a CUDA generator keeps it on the GPU)."""
    squeeze = x.dim() == 3
    xs = x.unsqueeze(1) if squeeze else x
    b, _, h, w = xs.shape
    n = torch.randn((b, 1, resolution, resolution), generator=generator,
                    device=generator.device) * std
    n = torch.nn.functional.interpolate(n, size=(h, w), mode="bilinear", align_corners=False)
    n = n.to(xs.device, xs.dtype)
    if mask is not None:
        m = mask.unsqueeze(1) if mask.dim() == 3 else mask
        n = n * m.to(n.dtype)
    y = xs + n
    return y[:, 0] if squeeze else y


# Spot corruption (model card, "Training data"): small Gaussian spots, the scale of a
# subtle cavernoma or aneurysm, which coarse noise alone does not teach the U-Net to repair.
SPOT_COUNT = (2, 6)  # spots per slice, inclusive
SPOT_SIGMA_PX = (0.7, 2.0)  # Gaussian sigma in pixels of the model input
SPOT_AMPLITUDE = (8 / 80, 30 / 80)  # 8-30 HU in brain-window units (the 80 HU window)
SPOT_HYPERDENSE = 0.7  # share of spots brighter than the tissue
SPOT_WEIGHT_THRESHOLD = 0.01  # window units (0.8 HU): where the loss weight applies


def small_spots(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Additive field of 2-6 small Gaussian spots per slice, centred on random brain pixels.

    ``mask`` (B,S,S) bool, the brain; slices with under 50 brain pixels get none. Sigma 0.7-2.0
    px, peak 8-30 HU (window units), 70 % hyperdense; the field is zero outside ``mask``."""
    b, h, w = mask.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    f = torch.zeros((b, h, w))
    lo_n, hi_n = SPOT_COUNT
    (lo_s, hi_s), (lo_a, hi_a) = SPOT_SIGMA_PX, SPOT_AMPLITUDE
    for i in range(b):
        pts = torch.nonzero(mask[i].cpu())
        if len(pts) < 50:
            continue
        for _ in range(int(torch.randint(lo_n, hi_n + 1, (1,), generator=generator))):
            p = pts[int(torch.randint(0, len(pts), (1,), generator=generator))].float()
            sg = lo_s + (hi_s - lo_s) * float(torch.rand(1, generator=generator))
            amp = lo_a + (hi_a - lo_a) * float(torch.rand(1, generator=generator))
            if torch.rand(1, generator=generator) < 1.0 - SPOT_HYPERDENSE:
                amp = -amp
            f[i] += amp * torch.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * sg * sg))
    return f * mask.cpu()
