"""Quantizers that turn continuous latents into discrete ids.

VectorQuantizer follows LlamaGen's VQ: latents and codebook are l2-normalised (cosine lookup), the
codebook is pulled to the latents, the latents are committed to the codebook (beta), gradients pass
straight through. Usage is tracked, and codes that no latent picked during a window of steps are
restarted on random latents of the current batch (LlamaGen does not restart; small codebooks trained
briefly on a narrow world lose many codes without it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # same shape as the input latents
    ids: torch.Tensor        # (b, h, w) long
    loss: torch.Tensor       # codebook + commitment
    perplexity: torch.Tensor


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, usage_decay: float = 0.99):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.usage_decay = usage_decay
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.normal_(self.embedding.weight)
        # fraction of latents that picked each code, smoothed; a buffer so it is saved with the weights
        # smoothed share of latents per code (for reporting), and hits since the last restart (for restarts);
        # the window starts empty so the first restart seeds the whole codebook from real latents
        self.register_buffer("usage", torch.zeros(num_codes))
        self.register_buffer("window_hits", torch.zeros(num_codes), persistent=False)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(n, d) latents -> (n,) nearest code ids by cosine similarity."""
        return (F.normalize(z, dim=-1) @ self.codebook().t()).argmax(dim=-1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, h, w) ids -> (b, d, h, w) quantised latents."""
        if ids.min() < 0 or ids.max() >= self.num_codes:
            raise ValueError(f"code ids must lie in [0, {self.num_codes}), got [{int(ids.min())}, {int(ids.max())}]")
        return rearrange(self.codebook()[ids], "b h w d -> b d h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = F.normalize(rearrange(z, "b d h w -> (b h w) d"), dim=-1)
        ids = self.lookup(flat)
        zq = self.codebook()[ids]
        loss = F.mse_loss(zq, flat.detach()) + self.beta * F.mse_loss(flat, zq.detach())
        zq = flat + (zq - flat).detach()  # straight-through
        counts = torch.bincount(ids, minlength=self.num_codes).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        if self.training:
            with torch.no_grad():
                self.usage.mul_(self.usage_decay).add_(probs, alpha=1 - self.usage_decay)
                self.window_hits.add_(counts)
        return QuantizerOutput(rearrange(zq, "(b h w) d -> b d h w", b=b, h=h, w=w),
                               rearrange(ids, "(b h w) -> b h w", b=b, h=h, w=w), loss, perplexity)

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move codes that no latent picked since the last call onto random current latents.

        Returns how many moved. Call it every few steps (the recipes use 20)."""
        dead = (self.window_hits == 0).nonzero().flatten()
        self.window_hits.zero_()
        if dead.numel() == 0:
            return 0
        flat = rearrange(latents, "b d h w -> (b h w) d")
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator, device=flat.device)
        noise = 0.05 * torch.randn(dead.numel(), self.dim, generator=generator, device=flat.device)
        self.embedding.weight.data[dead] = F.normalize(flat[pick], dim=-1) + noise
        return int(dead.numel())
