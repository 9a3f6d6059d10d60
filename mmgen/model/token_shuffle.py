"""Token-Shuffle (Ma et al., 2025, arXiv 2504.17789): fold each s x s window of visual tokens into one
transformer position, and unfold one hidden state back into s^2 token predictions.

Input side: every visual token embedding (d) is compressed by a linear layer to d / s^2, the s^2 compressed
embeddings of a window are concatenated into one d-vector (the "shuffle", a reshape) and refined by residual
MLP blocks. Output side: the hidden state of a position is refined by residual MLP blocks, cut into s^2
chunks of d / s^2 (the "unshuffle"), each chunk is mapped back to d by a shared linear layer and refined by
residual MLP blocks, and the model's one head predicts all s^2 tokens of the next window from there
(cross-entropy on every token). The transformer runs over N / s^2 positions instead of N, so training and
sampling cost about s^2 times less; the sampler writes s^2 tokens per forward pass, each drawn independently
given the position's hidden state (as in the paper).

Windows are taken in raster order over a 2-D token grid and tokens inside a window in raster order;
``to_windows`` / ``to_raster`` convert between that order and the tokenizer's raster order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    """x + W2 silu(W1 rmsnorm(x)); W2 starts at zero so a fresh block is the identity."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))))


class TokenShuffle(nn.Module):
    def __init__(self, dim: int, window: int, grid: tuple[int, int], blocks: int = 2):
        super().__init__()
        s = int(window)
        if s < 2:
            raise ValueError(f"TokenShuffle needs a window of at least 2 (window 1 is the plain model), got {s}")
        h, w = (int(g) for g in grid)
        if h <= 0 or w <= 0:
            raise ValueError(f"Token-Shuffle needs the token grid (H, W), got {tuple(grid)}")
        if h % s or w % s:
            raise ValueError(f"token grid {h}x{w} is not divisible by the shuffle window {s}")
        if dim % (s * s):
            raise ValueError(f"hidden size {dim} is not divisible by window^2 = {s * s}")
        self.s, self.grid, self.dim = s, (h, w), dim
        sub = dim // (s * s)
        self.compress = nn.Linear(dim, sub)
        self.merge_blocks = nn.ModuleList(ResidualMLP(dim, dim) for _ in range(blocks))
        self.split_blocks = nn.ModuleList(ResidualMLP(dim, dim) for _ in range(blocks))
        self.restore = nn.Linear(sub, dim)
        self.token_blocks = nn.ModuleList(ResidualMLP(dim, dim) for _ in range(blocks))

    @property
    def tokens_per_window(self) -> int:
        return self.s * self.s

    @property
    def num_windows(self) -> int:
        return (self.grid[0] // self.s) * (self.grid[1] // self.s)

    # ---- order ------------------------------------------------------------------------------------------
    def to_windows(self, x: torch.Tensor, partial: bool = False) -> torch.Tensor:
        """(b, H*W, ...) raster order -> (b, windows, s*s, ...) window order.

        ``partial``: x may hold only the top rows of the grid (a whole number of window rows)."""
        b, n = x.shape[:2]
        (h, w), s = self.grid, self.s
        if partial and n % (s * w) == 0 and 0 < n <= h * w:
            h = n // w
        elif n != h * w:
            raise ValueError(f"expected {h * w} tokens for a {h}x{w} grid"
                             + (f" or the top rows in multiples of {s * w}" if partial else "") + f", got {n}")
        rest = x.shape[2:]
        x = x.reshape(b, h // s, s, w // s, s, *rest).transpose(2, 3)
        return x.reshape(b, (h // s) * (w // s), s * s, *rest)

    def to_raster(self, x: torch.Tensor) -> torch.Tensor:
        """(b, windows, s*s, ...) window order -> (b, H*W, ...) raster order."""
        (h, w), s = self.grid, self.s
        b = x.shape[0]
        if x.shape[1:3] != (self.num_windows, s * s):
            raise ValueError(f"expected (b, {self.num_windows}, {s * s}, ...), got {tuple(x.shape)}")
        rest = x.shape[3:]
        x = x.reshape(b, h // s, w // s, s, s, *rest).transpose(2, 3)
        return x.reshape(b, h * w, *rest)

    # ---- shuffle / unshuffle ----------------------------------------------------------------------------
    def merge(self, emb: torch.Tensor) -> torch.Tensor:
        """Token embeddings in window order (b, n, s*s, d) -> one embedding per window (b, n, d)."""
        b, n = emb.shape[:2]
        x = self.compress(emb).reshape(b, n, self.dim)
        for blk in self.merge_blocks:
            x = blk(x)
        return x

    def split(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (b, n, d) -> one state per token of the next window (b, n, s*s, d)."""
        b, n, d = hidden.shape
        x = hidden
        for blk in self.split_blocks:
            x = blk(x)
        x = self.restore(x.reshape(b, n, self.tokens_per_window, d // self.tokens_per_window))
        for blk in self.token_blocks:
            x = blk(x)
        return x
