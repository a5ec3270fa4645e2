"""The detector networks: the denoising U-Net and its ensemble (``DenoisingUNet``,
``UNetEnsemble``; the bundled detector is an ensemble of four), and a convolutional VAE with a
geometric-transformation head.

Venkatakrishnan, Kim et al. (2020) put a classifier on the VAE encoder's features that predicts
which of 20 geometric transforms (4 rotations x {none, up, down, left, right} shift by 1/8 of the
image) was applied to the input. The decoder reconstructs the (transformed) input. The VAE class
serves every VAE-based method of the harness: a method that does not use the geometric head simply
does not train it (``NetConfig.geo_head=False`` drops it from the checkpoint).

Pure PyTorch: no DICOM, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import nn

N_GEO_CLASSES = 20


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters; saved verbatim in every checkpoint."""

    input_size: int = 128
    base_channels: int = 16
    max_channels: int = 128
    bottleneck_size: int = 4  # spatial side of the last encoder feature map
    z_dim: int = 256
    geo_hidden: int = 256
    geo_head: bool = True
    n_geo_classes: int = N_GEO_CLASSES
    arch: str = "vae"  # "vae" (MultitaskVAE) | "unet" (DenoisingUNet, the ``dae`` method)
    #                    | "ensemble" (UNetEnsemble: the mean reconstruction of ``members``)
    unet_levels: int = 4  # stride-2 downsamplings of the U-Net
    members: tuple[dict[str, Any], ...] = ()  # ensemble: each member's own config (arch "unet")

    def __post_init__(self) -> None:
        s = self.input_size
        if s < 16 or s & (s - 1):
            raise ValueError(f"input_size must be a power of two >= 16, got {s}")
        if self.bottleneck_size < 1 or s % self.bottleneck_size or s < 2 * self.bottleneck_size:
            raise ValueError("bottleneck_size must divide input_size and be at most input_size/2")
        if self.arch not in ("vae", "unet", "ensemble"):
            raise ValueError(f"arch must be 'vae', 'unet' or 'ensemble', got {self.arch!r}")
        if self.arch == "unet" and not 1 <= self.unet_levels <= 6:
            raise ValueError("unet_levels must be in 1..6")
        if self.arch == "ensemble":
            object.__setattr__(self, "members", tuple(dict(m) for m in self.members))
            if len(self.members) < 2:
                raise ValueError("an ensemble needs at least two members")
            for m in self.member_configs():
                if m.arch != "unet" or m.input_size != s:
                    raise ValueError(f"ensemble members must be {s}x{s} U-Nets (arch 'unet'), "
                                     f"got arch {m.arch!r} at {m.input_size}x{m.input_size}")
        elif self.members:
            raise ValueError("members are for arch 'ensemble' only")

    def member_configs(self) -> list[NetConfig]:
        return [NetConfig.from_dict(m) for m in self.members]

    @property
    def n_down(self) -> int:
        return (self.input_size // self.bottleneck_size).bit_length() - 1

    def channels(self) -> list[int]:
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(self.n_down)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _norm(c: int) -> nn.Module:
    # GroupNorm, not BatchNorm: independent of batch size, identical in train/eval, DDP-safe.
    return nn.GroupNorm(min(8, c), c)


class Encoder(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels():
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), _norm(c), nn.LeakyReLU(0.2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.feat_dim = c_in * cfg.bottleneck_size**2
        self.to_stats = nn.Linear(self.feat_dim, 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(x).flatten(1)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return h, mu, logvar.clamp(-12.0, 8.0)


class Decoder(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        chans = cfg.channels()[::-1]
        self.c0, self.s0 = chans[0], cfg.bottleneck_size
        self.fc = nn.Linear(cfg.z_dim, chans[0] * cfg.bottleneck_size**2)
        layers: list[nn.Module] = [nn.LeakyReLU(0.2)]
        for i, c in enumerate(chans):
            c_out = chans[i + 1] if i + 1 < len(chans) else cfg.base_channels
            layers += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1), _norm(c_out),
                       nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(cfg.base_channels, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.c0, self.s0, self.s0)
        return torch.sigmoid(self.net(h))  # inputs are brain-window intensities in [0, 1]


class GeoHead(nn.Module):
    def __init__(self, cfg: NetConfig, feat_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(feat_dim, cfg.geo_hidden), nn.LeakyReLU(0.2), nn.Dropout(0.1),
            nn.Linear(cfg.geo_hidden, cfg.n_geo_classes),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class NetOutput(NamedTuple):
    recon: torch.Tensor  # (B,1,S,S) in [0,1]
    mu: torch.Tensor  # (B,z)
    logvar: torch.Tensor  # (B,z)
    geo_logits: torch.Tensor | None  # (B,20) or None without a geometric head


class MultitaskVAE(nn.Module):
    """VAE encoder/decoder plus a geometric head on the encoder's features."""

    def __init__(self, cfg: NetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or NetConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        self.geo = GeoHead(self.cfg, self.encoder.feat_dim) if self.cfg.geo_head else None

    def forward(self, x: torch.Tensor, *, sample: bool | None = None,
                generator: torch.Generator | None = None, decode: bool = True) -> NetOutput:
        """``sample`` (default: ``self.training``) draws z ~ q(z|x); otherwise z = mu."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        h, mu, logvar = self.encoder(x)
        sample = self.training if sample is None else sample
        if sample:
            noise = torch.randn(mu.shape, generator=generator, device="cpu").to(mu.device) \
                if generator is not None else torch.randn_like(mu)
            z = mu + noise * torch.exp(0.5 * logvar)
        else:
            z = mu
        recon = self.decoder(z) if decode else x.new_zeros(0)
        geo = self.geo(h) if self.geo is not None else None
        return NetOutput(recon, mu, logvar, geo)


class _Block(nn.Sequential):
    """Two 3x3 convolutions with GroupNorm and LeakyReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), _norm(c_out), nn.LeakyReLU(0.2),
                         nn.Conv2d(c_out, c_out, 3, padding=1), _norm(c_out), nn.LeakyReLU(0.2))


class DenoisingUNet(nn.Module):
    """U-Net denoising autoencoder (Kascenas, Pugeault and O'Neil 2022, "Denoising autoencoders
    for unsupervised anomaly detection in brain MRI").

    Trained to remove *coarse* noise (low-resolution Gaussian noise upsampled to the image) from
    normal slices; at test time it is given the clean slice, and whatever it "repairs" (tissue
    that does not look like normal tissue at that place) shows up in the residual. The skip
    connections keep fine normal anatomy (skull base, sulci) sharp, where a VAE blurs it into
    false-positive residual. Returns a ``NetOutput`` with empty ``mu``/``logvar`` and no
    geometric logits, so scoring code treats it like any reconstruction model.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(cfg.unet_levels + 1)]
        self.down = nn.ModuleList()
        c_in = 1
        for c in chans[:-1]:
            self.down.append(_Block(c_in, c))
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.mid = _Block(chans[-2], chans[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        c_prev = chans[-1]
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(c_prev, c, 2, stride=2))
            self.dec.append(_Block(2 * c, c))
            c_prev = c
        self.out = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor, *, sample: bool | None = None,
                generator: torch.Generator | None = None, decode: bool = True) -> NetOutput:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        skips = []
        h = x
        for blk in self.down:
            h = blk(h)
            skips.append(h)
            h = self.pool(h)
        h = self.mid(h)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            h = dec(torch.cat([up(h), skip], 1))
        empty = x.new_zeros(x.shape[0], 0)
        return NetOutput(self.out(h), empty, empty, None)


class UNetEnsemble(nn.Module):
    """Several denoising U-Nets trained apart (other seeds or widths) on the same normal data;
    the reconstruction is the mean of theirs. Averaging removes what each member got wrong on
    its own (its idiosyncratic residual on normal tissue) and keeps what they agree is abnormal.
    Inference only: members are trained one by one and combined by ``triage_model.ensemble``."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(DenoisingUNet(m) for m in cfg.member_configs())

    def forward(self, x: torch.Tensor, *, sample: bool | None = None,
                generator: torch.Generator | None = None, decode: bool = True) -> NetOutput:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        recon = torch.stack([m(x).recon for m in self.members]).mean(0)
        empty = x.new_zeros(x.shape[0], 0)
        return NetOutput(recon, empty, empty, None)


def build_network(cfg: NetConfig) -> nn.Module:
    """The network a config describes: ``MultitaskVAE``, ``DenoisingUNet`` or ``UNetEnsemble``."""
    if cfg.arch == "ensemble":
        return UNetEnsemble(cfg)
    return DenoisingUNet(cfg) if cfg.arch == "unet" else MultitaskVAE(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
