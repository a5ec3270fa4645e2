"""Fine-tuning from an ensemble file (the bundled model is four U-Nets): a clear error naming the
cause and the fix, and ``--init-member K`` to start from member K."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from triage_model.checkpoint import make_checkpoint, save_checkpoint
from triage_model.network import NetConfig, build_network
from triage_model.train import init_state_dict, main, random_slices

S = 32
UNET = NetConfig(input_size=S, base_channels=4, max_channels=16, arch="unet", geo_head=False,
                 unet_levels=3)


def _ensemble(n: int = 2) -> dict:  # type: ignore[type-arg]
    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=S, arch="ensemble", members=(UNET.to_dict(),) * n))
    return make_checkpoint("dae", net=net, input_size=S)


def test_init_member_takes_that_members_weights() -> None:
    ck = _ensemble(3)
    with pytest.raises(ValueError, match=r"ensemble of 3 U-Nets.*--init-member K"):
        init_state_dict(ck, "detector.pt")
    with pytest.raises(ValueError, match="members 1-3"):
        init_state_dict(ck, "detector.pt", 4)
    one = build_network(UNET)
    one.load_state_dict(init_state_dict(ck, "detector.pt", 2))  # loads: shapes and keys fit
    for k, v in one.state_dict().items():
        assert torch.equal(v, ck["state_dict"][f"members.1.{k}"])
    single = make_checkpoint("dae", net=one, input_size=S)
    assert init_state_dict(single, "one.pt").keys() == one.state_dict().keys()
    with pytest.raises(ValueError, match="not an ensemble"):
        init_state_dict(single, "one.pt", 1)


def test_train_init_from_an_ensemble_says_why_and_how(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ens = tmp_path / "detector.pt"
    save_checkpoint(_ensemble(4), ens)
    random_slices(16, S, seed=0, n_series=4).save(tmp_path / "s.npz")
    rc = main([str(tmp_path / "out.pt"), "--slices", str(tmp_path / "s.npz"), "--method", "dae",
               "--steps", "1", "--init", str(ens)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "ensemble of 4 U-Nets" in err and "--init-member K" in err and "(1-4)" in err
    assert "Traceback" not in err and "does not match this configuration" not in err
    assert not (tmp_path / "out.pt").exists()


def test_fine_tune_moves_every_member_towards_the_site_and_keeps_the_rest() -> None:
    from triage_model.train import fine_tune

    ck = _ensemble(2)
    ck["thresholds"] = {"max": 1.5}
    site = random_slices(24, S, seed=3, n_series=3)
    new, rec = fine_tune(ck, site, steps=4, lr=1e-3, batch_size=4, seed=0)
    changed = {k.split(".")[1] for k, v in new["state_dict"].items()
               if not torch.equal(v, ck["state_dict"][k])}
    assert changed == {"0", "1"}  # both members trained, each with its own loss
    assert new["thresholds"] == {"max": 1.5} and new["net_config"] == ck["net_config"]
    assert (rec["steps"], rec["members"], rec["series"]) == (4, 2, 3)
    assert new["training"]["fine_tune"] == rec and "fine_tune" not in ck.get("training", {})
    again, _ = fine_tune(ck, site, steps=4, lr=1e-3, batch_size=4, seed=0)  # seeded
    for k, v in new["state_dict"].items():
        assert torch.allclose(v, again["state_dict"][k])
    with pytest.raises(ValueError, match="at least one step"):
        fine_tune(ck, site, steps=0)
    with pytest.raises(ValueError, match="expects 32x32"):
        fine_tune(ck, random_slices(4, 16, seed=0), steps=1)
    vae = make_checkpoint("multitask", net=build_network(NetConfig(input_size=S, base_channels=4,
                                                                   max_channels=16, z_dim=8,
                                                                   geo_hidden=16)))
    with pytest.raises(ValueError, match="denoising U-Net"):
        fine_tune(vae, site, steps=1)
