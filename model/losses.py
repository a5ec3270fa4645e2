"""Loss terms. Each returns a scalar averaged over the batch.

* ``rec_loss``: squared error summed over the pixels of an image (a unit-variance Gaussian
  log-likelihood up to a constant), mean over the batch. Optional ``weight`` (B,1,S,S) masks it.
* ``kl_loss``: KL(q(z|x) || N(0, I)) summed over the latent dimensions, mean over the batch.
* ``geo_loss``: cross-entropy of the geometric head against the applied transform label.
* ``vae_loss`` = rec + beta * KL; ``multitask_loss`` = L_geo + eps * (L_rec + beta * KL), the
  seed paper's objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triage_model.network import NetOutput


def rec_loss(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    if target.dim() == 3:
        target = target.unsqueeze(1)
    err = (recon - target) ** 2
    if weight is not None:
        err = err * weight
    return err.flatten(1).sum(1).mean()


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()


def geo_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def vae_loss(out: NetOutput, target: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    rec = rec_loss(out.recon, target)
    kl = kl_loss(out.mu, out.logvar)
    return {"loss": rec + beta * kl, "rec": rec.detach(), "kl": kl.detach()}


def multitask_loss(
    out: NetOutput, target: torch.Tensor, labels: torch.Tensor, eps: float, beta: float,
) -> dict[str, torch.Tensor]:
    if out.geo_logits is None:
        raise ValueError("multitask loss needs a network with a geometric head")
    geo = geo_loss(out.geo_logits, labels)
    terms = {"geo": geo.detach()}
    total = geo
    if eps > 0:
        rec = rec_loss(out.recon, target)
        kl = kl_loss(out.mu, out.logvar)
        total = total + eps * (rec + beta * kl)
        terms.update(rec=rec.detach(), kl=kl.detach())
    acc = (out.geo_logits.argmax(1) == labels).float().mean()
    terms.update(loss=total, acc=acc.detach())
    return terms
