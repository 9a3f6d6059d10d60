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


class BinaryQuantizer(nn.Module):
    """Lookup-free quantisation (LFQ, MAGVIT-v2): each of B latent channels becomes one bit by its sign, with a
    straight-through gradient; there is no codebook. The token id is the bit pattern read as an integer
    (channel i is bit i), so the vocabulary is 2^B.

    Loss: commitment (latents pulled to their +-1 code) and LFQ's entropy term, per-sample entropy down (each
    latent decides) and batch entropy up (codes used evenly). With codes at +-1 the code distribution
    softmax(-||z - c||^2 / T) factorises over bits (p(bit i = 1) = sigmoid(4 z_i / T)), so the per-sample entropy
    is exact as a sum of bit entropies. The batch term is the entropy of the batch's mean code distribution,
    computed exactly within groups of ``group_bits`` bits (a random split of the bits every training step) and
    summed over groups: LFQ's full 2^B sum costs tokens x 2^B, and the product of single-bit marginals
    (``group_bits = 1``) is gamed by bits that copy one another, each balanced over the batch while the codes
    collapse onto two (seen on the text world: all 13 bits encoded light versus dark background)."""

    def __init__(self, bits: int = 13, commit_weight: float = 0.25, entropy_weight: float = 0.1,
                 diversity_gamma: float = 1.0, temperature: float = 1.0, group_bits: int = 7):
        super().__init__()
        if not 1 <= bits <= 24:
            raise ValueError(f"bits must lie in [1, 24], got {bits}")
        if not 1 <= group_bits <= 10:
            raise ValueError(f"group_bits must lie in [1, 10], got {group_bits}")
        self.bits, self.commit_weight, self.entropy_weight = bits, commit_weight, entropy_weight
        self.diversity_gamma, self.temperature, self.group_bits = diversity_gamma, temperature, group_bits
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)

    @staticmethod
    def _bit_entropy(p: torch.Tensor) -> torch.Tensor:
        p = p.float().clamp(1e-6, 1 - 1e-6)
        return -(p * p.log() + (1 - p) * (1 - p).log())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (b, B, h, w) -> +-1 codes (straight-through), ids (b, h, w) in [0, 2^B), loss, perplexity."""
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        ids = self.ids(z)
        commit = F.mse_loss(z, q.detach())
        p = torch.sigmoid(4 * z / self.temperature)                           # (b, B, h, w): p(bit = 1)
        sample_h = self._bit_entropy(p).sum(1).mean()
        batch_h = self.batch_entropy(p)
        loss = self.commit_weight * commit + self.entropy_weight * (sample_h - self.diversity_gamma * batch_h)
        with torch.no_grad():
            counts = torch.bincount(ids.flatten(), minlength=2 ** self.bits).float()
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return QuantizerOutput(z + (q - z).detach(), ids, loss, perplexity)

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """z (b, B, h, w) -> ids (b, h, w): the sign bits alone, without forward's losses and code counts
        (what encoding needs; the counts' bincount would also read a value back from an accelerator)."""
        return ((z > 0).long() * self.powers.view(1, -1, 1, 1)).sum(1)

    def batch_entropy(self, p: torch.Tensor) -> torch.Tensor:
        """Entropy of the mean code distribution of bit probabilities p (b, B, h, w), summed over groups of
        ``group_bits`` bits (exact within a group; the split is random while training, fixed in eval)."""
        flat = rearrange(p.float(), "b c h w -> (b h w) c").clamp(1e-6, 1 - 1e-6)  # fp32: 1 - 1e-6 is 1 in fp16
        dev = p.device
        order = torch.randperm(self.bits, device=dev) if self.training else torch.arange(self.bits, device=dev)
        total = flat.new_zeros(())
        for group in order.split(self.group_bits):
            g = len(group)
            codes = ((torch.arange(2 ** g, device=dev)[:, None] >> torch.arange(g, device=dev)) & 1).float()
            logp = flat[:, group].log() @ codes.T + (1 - flat[:, group]).log() @ (1 - codes).T  # (n, 2^g)
            mean = logp.exp().mean(0)
            total = total - (mean * mean.clamp_min(1e-12).log()).sum()
        return total

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, h, w) ids -> (b, B, h, w) +-1 codes."""
        if ids.min() < 0 or ids.max() >= 2 ** self.bits:
            raise ValueError(f"token ids must lie in [0, {2 ** self.bits}), got [{int(ids.min())}, {int(ids.max())}]")
        bits = (ids[:, None] // self.powers.view(1, -1, 1, 1)) % 2
        return bits.float() * 2 - 1

    def codebook(self) -> torch.Tensor:
        """Every code as a +-1 vector: (2^B, B)."""
        ids = torch.arange(2 ** self.bits, device=self.powers.device)
        return ((ids[:, None] // self.powers) % 2).float() * 2 - 1
