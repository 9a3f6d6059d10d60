"""The binary text tokenizer's projector: a pre-norm transformer encoder over a 2-D token grid whose attention
reaches only the tokens at most ``window`` rows and columns away (neighbourhood attention).

The math is ``nn.TransformerEncoder`` of pre-norm ``nn.TransformerEncoderLayer``s (GELU, no dropout) with an
additive mask that is -inf outside the window, and the parameters have the same names, so weights trained with
either load into the other. What differs is the cost: a dense masked attention over a full 256x256 page's
64x64 = 4,096 tokens builds 4,096 x 4,096 scores per head and image (4.3 GB in fp32 for a batch of 16 with 4
heads), while here queries go in 8x8 tiles that score only their tile's halo (``blocked_window_attention``).
``window = 0`` (attend everywhere) runs the dense attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def window_mask(h: int, w: int, window: int, device=None) -> torch.Tensor:
    """The dense additive mask of the same attention: (h * w, h * w), 0 within ``window`` rows and columns,
    -inf outside (what a masked ``nn.TransformerEncoder`` would take; the tests check the two agree)."""
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    near = ((yy[:, None] - yy[None]).abs() <= window) & ((xx[:, None] - xx[None]).abs() <= window)
    return torch.zeros(near.shape, device=device).masked_fill(~near, float("-inf"))


def blocked_window_attention(q, k, v, h: int, w: int, window: int, heads: int, block: int = 8) -> torch.Tensor:
    """Attention of each token of an (h, w) grid to the tokens at most ``window`` rows and columns away.

    Queries go in ``block`` x ``block`` tiles; each tile attends to its keys' halo, the tile grown by ``window``
    on every side (gathered with ``F.unfold``), under a mask that keeps each query's own window and drops the
    zero padding past the grid's edge. (b, n, d) each -> (b, H, n, e). Costs tiles x block^2 x (block +
    2 window)^2 scores, all in dense batched matmuls."""
    bh, bw = -(-h // block), -(-w // block)
    ph, pw, side = bh * block - h, bw * block - w, block + 2 * window

    def grid(t):  # (b, n, d) -> (b, d, h', w'), zero-padded to whole tiles
        return F.pad(rearrange(t, "b (h w) d -> b d h w", h=h, w=w), (0, pw, 0, ph))

    def halos(t):  # -> (b, tiles, H, side^2, e)
        cols = F.unfold(grid(t), side, padding=window, stride=block)  # (b, d * side^2, tiles)
        return rearrange(cols, "b (H e m) t -> b t H m e", H=heads, m=side * side)

    tiles = rearrange(grid(q), "b (H e) (th p1) (tw p2) -> b (th tw) H (p1 p2) e", H=heads, p1=block, p2=block)
    # which halo keys each tile position may see: inside the grid and within the window
    inside = F.pad(torch.ones(1, 1, h, w, device=q.device), (0, pw, 0, ph))
    inside = F.unfold(inside, side, padding=window, stride=block)[0].T > 0  # (tiles, side^2)
    qy, qx = torch.meshgrid(torch.arange(block, device=q.device), torch.arange(block, device=q.device), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(side, device=q.device), torch.arange(side, device=q.device), indexing="ij")
    near = (((ky.flatten()[None] - window - qy.flatten()[:, None]).abs() <= window)
            & ((kx.flatten()[None] - window - qx.flatten()[:, None]).abs() <= window))  # (block^2, side^2)
    # queries in the tile padding see everything: their rows are thrown away, and a row with no key at all
    # is NaN in some attention kernels, whose backward would spread it to the real keys of the tile
    padded = F.pad(torch.ones(h, w, dtype=torch.bool, device=q.device), (0, pw, 0, ph)) == 0
    padded = rearrange(padded, "(th p1) (tw p2) -> (th tw) (p1 p2)", p1=block, p2=block)
    mask = (near[None] & inside[:, None]) | padded[:, :, None]  # (tiles, block^2, side^2)
    # one mask for every image and head: broadcast over b and H
    out = F.scaled_dot_product_attention(tiles, halos(k), halos(v), attn_mask=mask[:, None])
    out = rearrange(out, "b (th tw) H (p1 p2) e -> b H (th p1) (tw p2) e", th=bh, tw=bw, p1=block, p2=block)
    return rearrange(out[:, :, :h, :w], "b H h w e -> b H (h w) e")


class LocalEncoderLayer(nn.Module):
    """One pre-norm layer: x + attention(norm1(x)), then x + MLP(norm2(x)); attention within the window."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)  # holds the weights
        self.linear1, self.linear2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def attend(self, x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
        """x (b, h * w, d), normalised -> attention output (b, h * w, d)."""
        attn = self.self_attn
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        if window <= 0 or (window >= h - 1 and window >= w - 1):  # every token is in every window: dense
            q, k, v = (rearrange(t, "b n (H e) -> b H n e", H=self.heads) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = blocked_window_attention(q, k, v, h, w, window, self.heads)
        return attn.out_proj(rearrange(out, "b H n e -> b n (H e)"))

    def forward(self, x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
        x = x + self.attend(self.norm1(x), h, w, window)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class LocalProjector(nn.Module):
    """A stack of ``LocalEncoderLayer``s over an (h, w) token grid: (b, h * w, d) -> (b, h * w, d)."""

    def __init__(self, d: int, heads: int, layers: int, hidden: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"the width {d} must be a multiple of the heads {heads}")
        self.layers = nn.ModuleList(LocalEncoderLayer(d, heads, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, h, w, window)
        return x
