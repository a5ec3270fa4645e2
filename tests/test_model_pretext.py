"""Exact checks of the 20 geometric transforms and the context-restoration patch swap."""

from __future__ import annotations

import pytest
import torch
from triage_model import pretext


def _img(size: int = 16) -> torch.Tensor:
    return torch.arange(size * size, dtype=torch.float32).view(size, size)


def test_labels_enumerate_rotations_times_shifts():
    params = [pretext.transform_params(t) for t in range(20)]
    assert len(set(params)) == 20
    assert params[0] == (0, 0, 0)
    assert params[1] == (0, -1, 0)  # up
    assert params[2] == (0, 1, 0)  # down
    assert params[3] == (0, 0, -1)  # left
    assert params[4] == (0, 0, 1)  # right
    assert params[5] == (1, 0, 0)
    assert params[19] == (3, 0, 1)
    assert pretext.transform_name(7) == "rot90-down"
    with pytest.raises(ValueError):
        pretext.transform_params(20)


def test_identity_rotation_and_shift_pixels_exact():
    x = _img(16)
    assert torch.equal(pretext.apply_transform(x, 0), x)
    # rot90 counter-clockwise: top-right corner goes to top-left
    r = pretext.apply_transform(x, 5)
    assert r[0, 0] == x[0, 15] and r[15, 0] == x[0, 0]
    # shift by 16 // 8 = 2 pixels
    up = pretext.apply_transform(x, 1)
    assert torch.equal(up[0], x[2]) and torch.equal(up[13], x[15]) and torch.equal(up[14], x[0])
    down = pretext.apply_transform(x, 2)
    assert torch.equal(down[2], x[0])
    left = pretext.apply_transform(x, 3)
    assert torch.equal(left[:, 0], x[:, 2])
    right = pretext.apply_transform(x, 4)
    assert torch.equal(right[:, 2], x[:, 0])
    # rotation first, then the shift
    rr = pretext.apply_transform(x, 5 * 2 + 4)
    assert torch.equal(rr, torch.roll(torch.rot90(x, 2), 2, dims=1))


def test_all_twenty_distinct_and_exactly_invertible():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g)
    outs = []
    for t in range(20):
        y = pretext.apply_transform(x, t)
        assert y.shape == x.shape
        assert torch.equal(pretext.invert_transform(y, t), x)
        # a permutation of pixels: same multiset of values
        assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
        outs.append(y)
    for i in range(20):
        for j in range(i + 1, 20):
            assert not torch.equal(outs[i], outs[j])


def test_batched_transforms_match_single_and_all_transforms_order():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 8, 8, generator=g)
    labels = torch.tensor([0, 19, 7, 7, 3, 12])
    y = pretext.apply_transforms(x, labels)
    for i, t in enumerate(labels.tolist()):
        assert torch.equal(y[i], pretext.apply_transform(x[i], t))
    views, lab = pretext.all_transforms(x)
    assert views.shape == (120, 8, 8) and lab.shape == (120,)
    assert torch.equal(views[6 * 7 + 2], pretext.apply_transform(x[2], 7)) and lab[6 * 7 + 2] == 7


def test_patch_swap_exact_and_reproducible():
    size = 32
    x = torch.stack([_img(size), _img(size) + 5000])
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    g1 = torch.Generator().manual_seed(3)
    y, rec = pretext.patch_swap(x, mask, g1, n_swaps=1)
    g2 = torch.Generator().manual_seed(3)
    y2, rec2 = pretext.patch_swap(x, mask, g2, n_swaps=1)
    assert torch.equal(y, y2) and rec == rec2
    p = size // 8
    for b in range(2):
        assert len(rec[b]) == 1
        (a0, a1), (c0, c1) = rec[b][0]
        # centres were inside the mask, so boxes overlap it
        assert 8 - p < a0 < 24 and 8 - p < c0 < 24
        assert torch.equal(y[b, a0:a0 + p, a1:a1 + p], x[b, c0:c0 + p, c1:c1 + p])
        assert torch.equal(y[b, c0:c0 + p, c1:c1 + p], x[b, a0:a0 + p, a1:a1 + p])
        changed = torch.zeros(size, size, dtype=torch.bool)
        changed[a0:a0 + p, a1:a1 + p] = True
        changed[c0:c0 + p, c1:c1 + p] = True
        assert torch.equal(y[b][~changed], x[b][~changed])
        assert int(changed.sum()) == 2 * p * p  # non-overlapping
    assert torch.equal(x[0], _img(size))  # input untouched


def test_patch_swap_does_not_touch_global_rng_and_keeps_shape():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    m = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    y, rec = pretext.patch_swap(x, m, torch.Generator().manual_seed(5), n_swaps=3)
    assert y.shape == x.shape and all(len(r) == 3 for r in rec)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_context_encoding_noise_boxes_within_range():
    x = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0))
    y = pretext.context_encoding_noise(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert float(y.min()) >= float(x.min()) - 1e-6 and float(y.max()) <= float(x.max()) + 1e-6
