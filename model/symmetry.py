"""Left-right symmetry of axial head slices: each slice's midline, and the residual its mirror
image does not explain.

Why: most focal lesions lie on one side of the brain, while the normal anatomy a reconstruction
model struggles with (large ventricles and sulci, which it partly fills in) lies on both. The
*asymmetric residual* ``clamp(h - mirror(h), 0)`` keeps the part of a residual map ``h`` that the
same place on the other side does not show, so a residual both sides share cancels.

The midline is fitted per slice, with no anatomy model: the reflection (a line at angle ``theta``
from vertical, ``offset`` pixels from the image centre) under which the slice best matches its
mirror image (mean absolute difference over the whole frame, where skull and brain outline
dominate). A coarse grid at half resolution, then a finer one around the best coarse line. The
search range covers the head poses a scanner produces once the head is centred (preprocessing
centres it): +-12 degrees of in-plane rotation, +-10 pixels at 128x128.

Reflections are 2x3 affine matrices in the normalised coordinates of
``torch.nn.functional.affine_grid`` (x to the right, y down, both in [-1, 1]); a reflection is
its own inverse, so the same matrix maps output to input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAX_ANGLE_DEG = 12.0
MAX_OFFSET_PX = 10.0  # at 128x128; scaled with the input size


def _rot(theta: torch.Tensor) -> torch.Tensor:
    """(B,3,3) rotations in affine_grid's normalised coordinates."""
    c, s = torch.cos(theta), torch.sin(theta)
    z, one = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1),
                        torch.stack([z, z, one], -1)], -2)


def reflection(theta: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(B,2,3) reflections about the line that the vertical line ``x = offset`` becomes when the
    frame is rotated by ``theta`` (radians) about the centre; ``offset`` in normalised units
    (2 = the image width). Sampling an image through it gives its mirror image."""
    f = torch.zeros(theta.shape[0], 3, 3, dtype=torch.float32, device=theta.device)
    f[:, 0, 0], f[:, 0, 2], f[:, 1, 1], f[:, 2, 2] = -1.0, 2 * offset.float(), 1.0, 1.0
    r = _rot(theta.float())
    return (r @ f @ r.transpose(1, 2))[:, :2]


def mirror(maps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Reflect (B,S,S) or (B,1,S,S) maps by (B,2,3) matrices (bilinear, zero outside)."""
    squeeze = maps.dim() == 3
    img = maps.unsqueeze(1) if squeeze else maps
    grid = F.affine_grid(m.to(img.device, img.dtype), list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0] if squeeze else out


def _rotate(img: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(_rot(theta)[:, :2].to(img.dtype), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _search(img: torch.Tensor, thetas: torch.Tensor, base: torch.Tensor, deltas: range
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice, the best (theta, shift) among candidate angles ``thetas`` (B,A) and column
    shifts ``base + d`` (``base`` (B,), d in ``deltas``): the slice rotated by theta is compared
    with its left-right flip moved by ``shift`` columns (zeros moved in), which is its mirror
    image about the vertical line ``shift / 2`` pixels right of the centre. Cost: one
    resampling per angle; the shifts are views of one padded copy."""
    b, a = thetas.shape
    size = img.shape[-1]
    pad = max(abs(d) for d in deltas)
    best_e = torch.full((b,), float("inf"), device=img.device)
    best_t = torch.zeros(b, device=img.device)
    best_s = torch.zeros(b, dtype=torch.long, device=img.device)
    cols = torch.arange(size, device=img.device)
    moved = bool(torch.any(base != 0))
    for i in range(a):
        r = _rotate(img, thetas[:, i])[:, 0]  # (B,S,S)
        f = r.flip(-1)
        if moved:  # move each slice's flip by its base shift first
            src = cols[None, :] - base[:, None]
            valid = (src >= 0) & (src < size)
            f = torch.gather(f, 2, src.clamp(0, size - 1)[:, None, :].expand(-1, size, -1))
            f = f * valid[:, None, :]
        fp = F.pad(f, (pad, pad))
        for d in deltas:
            e = (r - fp[..., pad - d:pad - d + size]).abs().mean((1, 2))
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_t = torch.where(better, thetas[:, i], best_t)
            best_s = torch.where(better, base + d, best_s)
    return best_t, best_s


@torch.inference_mode()
def fit_midline(x: torch.Tensor) -> torch.Tensor:
    """(B,2,3) reflection about each slice's fitted midline; ``x`` (B,S,S) or (B,1,S,S)."""
    img = (x.unsqueeze(1) if x.dim() == 3 else x).float()
    b, size = img.shape[0], img.shape[-1]
    if b == 0:
        return torch.zeros(0, 2, 3, device=img.device)
    dev = img.device
    # coarse, at half resolution: 2 degrees, shifts of one half-resolution column (= the
    # midline moved by one full-resolution pixel)
    half = F.avg_pool2d(img, 2) if size >= 64 else img
    scale = size // half.shape[-1]
    max_s = int(round(2 * MAX_OFFSET_PX * size / 128.0 / scale))
    angles = torch.as_tensor(np.radians(np.arange(-MAX_ANGLE_DEG, MAX_ANGLE_DEG + 1e-6, 2.0)),
                             dtype=torch.float32, device=dev)
    t, s = _search(half, angles[None].expand(b, -1), torch.zeros(b, dtype=torch.long, device=dev),
                   range(-max_s, max_s + 1))
    # fine, at full resolution: 0.5 degree, half-pixel midline steps around the coarse optimum
    dt = torch.as_tensor(np.radians(np.arange(-1.5, 1.5 + 1e-6, 0.5)), dtype=torch.float32,
                         device=dev)
    t, s = _search(img, t[:, None] + dt[None], s * scale, range(-scale, scale + 1))
    # the line sits s/2 pixels right of the centre in the rotated frame
    return reflection(t, s.float() / 2 * (2.0 / size))


def asymmetric_residual(heat: torch.Tensor, brain: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``clamp(heat - mirror(heat), 0)`` where the brain and its mirror image overlap (zero
    elsewhere); ``heat`` and ``brain`` (B,S,S), ``m`` from ``fit_midline``."""
    both = brain & (mirror(brain.to(heat.dtype), m) > 0.5)
    return (heat - mirror(heat, m)).clamp(min=0) * both.to(heat.dtype)
