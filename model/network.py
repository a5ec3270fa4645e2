"""The detector network: a convolutional VAE with a geometric-transformation head.

Venkatakrishnan, Kim et al. (2020) put a classifier on the VAE encoder's features that predicts
which of 20 geometric transforms (4 rotations x {none, up, down, left, right} shift by 1/8 of the
image) was applied to the input. The decoder reconstructs the (transformed) input. The same class
serves every learned method of the harness: a method that does not use the geometric head simply
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

    def __post_init__(self) -> None:
        s = self.input_size
        if s < 16 or s & (s - 1):
            raise ValueError(f"input_size must be a power of two >= 16, got {s}")
        if self.bottleneck_size < 1 or s % self.bottleneck_size or s < 2 * self.bottleneck_size:
            raise ValueError("bottleneck_size must divide input_size and be at most input_size/2")

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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
