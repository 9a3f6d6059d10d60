"""Distilled Decoding (DD; Liu et al., arXiv 2412.17153): one- and two-step sampling from an AR image model.

The flow map
    For one position the teacher's next-token distribution p over codebook vectors c_k is a mixture of
    point masses. Linear flow matching from Gaussian noise x_0 ~ N(0, I) (x_t = t c + (1 - t) x_0) has the
    closed-form velocity v(x, t) = sum_k w_k(x, t) (c_k - x) / (1 - t), with w_k proportional to
    p_k N(x; t c_k, (1 - t)^2 I). Integrating it from t = 0 to 1 maps a noise vector deterministically to one
    codebook entry, and pushes N(0, I) forward to p (so the map is a sampler). ``flow_map`` integrates with
    the exponential step x <- x + (t' - t) / (1 - t) (m - x), m = sum_k w_k c_k (exact when the weights are
    constant over the step, stable up to t = 1), and returns the code with the largest posterior weight.

    Running the teacher position by position with the flow map in place of its sampler maps a whole noise
    sequence to a token sequence (``teacher_tokens``): the (noise, tokens) pairs the student learns from.

The student (``DDStudent``)
    Initialised from the teacher. Its inputs are a linear map from codebook-vector space (noise vectors, or
    data vectors c_k of known tokens) plus a learnt marker saying noise or data; it predicts every token at
    once (with Token-Shuffle, every token of every window). One step: noise -> all tokens. Two steps: the
    tokens of the first ``split`` positions from step one become data inputs, the rest keep their noise, and
    a second pass predicts everything.

How mmgen's training differs from the paper's (whose training code is unreleased): the paper trains the
student on the flow-map pairs with a divergence on the predicted distributions and re-noises intermediate
states along the flow trajectory for multi-step sampling. mmgen uses cross-entropy of the student's logits
against the teacher's tokens (the pairs are deterministic, so this is the maximum-likelihood form of the
same regression), and for two steps it conditions on the teacher's own tokens before a random split with
the original noise after it, which is exactly what the flow map determines (tokens after the split are a
function of the tokens before it and of their own noise).
"""
from __future__ import annotations

import time

import torch

from mmgen.sampling.ar import SamplingOptions, SamplingRecord, filter_logits, sample_ar

FLOW_STEPS = 48


def flow_map(probs: torch.Tensor, codebook: torch.Tensor, noise: torch.Tensor, steps: int = FLOW_STEPS) -> torch.Tensor:
    """probs (n, K) over codes, codebook (K, D), noise (n, D) -> code ids (n,), deterministically.

    Integrates the closed-form flow-matching velocity of the point-mass mixture sum_k p_k delta(c_k) from
    t = 0 (the noise) towards t = 1 on a grid that is denser near 1, where the posterior sharpens."""
    if probs.dim() != 2 or noise.dim() != 2 or probs.shape[0] != noise.shape[0]:
        raise ValueError(f"expected probs (n, K) and noise (n, D), got {tuple(probs.shape)} and {tuple(noise.shape)}")
    if probs.shape[1] != codebook.shape[0] or noise.shape[1] != codebook.shape[1]:
        raise ValueError(f"codebook {tuple(codebook.shape)} does not fit probs {tuple(probs.shape)} / noise "
                         f"{tuple(noise.shape)}")
    logp = probs.float().clamp_min(0).log()
    c = codebook.float()
    x = noise.float()
    c_sq = (c * c).sum(-1)                                               # (K,)
    # t grid: 1 - (1 - u)^2 puts half the steps in the last quarter of the path
    grid = [1.0 - (1.0 - i / steps) ** 2 for i in range(steps + 1)]
    w = None
    for t, t_next in zip(grid[:-1], grid[1:]):
        w = _posterior(x, c, c_sq, logp, t)
        x = x + (t_next - t) / (1.0 - t) * (w @ c - x)
    return w.argmax(-1)  # the posterior at the last grid time before 1 (t = 1 - 1/steps^2) has collapsed


def _posterior(x, c, c_sq, logp, t: float) -> torch.Tensor:
    """w_k proportional to p_k N(x; t c_k, (1 - t)^2 I), (n, K)."""
    var = max(1.0 - t, 1e-6) ** 2
    # -||x - t c||^2 / (2 var), dropping the term in ||x||^2 that is the same for every k
    logits = logp + (t * (x @ c.t()) - 0.5 * t * t * c_sq) / var
    return torch.softmax(logits, dim=-1)


def noise_like(batch: int, num_tokens: int, dim: int, generator=None) -> torch.Tensor:
    """Standard normal noise (b, N, D); ``generator`` may be one torch.Generator or one per row."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return torch.stack([torch.randn(num_tokens, dim, generator=g) for g in generator])
    return torch.randn(batch, num_tokens, dim, generator=generator)




# ---- the teacher: AR decoding with the flow map in place of the random draw ------------------------------
@torch.no_grad()
def teacher_tokens(model, prefix: torch.Tensor, null_prefix: torch.Tensor | None, start_ids: torch.Tensor,
                   noise: torch.Tensor, token_range: tuple[int, int], codebook: torch.Tensor, options,
                   progress: bool = False):
    """Map noise (b, N, D) (one vector per image token, raster order) to the teacher's tokens (b, N) (unified
    ids) by running it position by position with the flow map; the teacher's guidance, temperature, top-k,
    top-p and min-p shape each position's distribution. Returns (ids, record)."""
    options = (options or SamplingOptions()).validate()
    k = model.tokens_per_step
    b, n, dim = noise.shape
    if b != prefix.shape[0] or dim != codebook.shape[1]:
        raise ValueError(f"noise {tuple(noise.shape)} does not fit a batch of {prefix.shape[0]} and codes of "
                         f"{codebook.shape[1]} dimensions")
    per_step = model.shuffle.to_windows(noise) if k > 1 else noise[:, :, None]  # (b, steps, k, D)

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        v = logits.shape[-1]
        flat = logits.reshape(b * k, v) / options.temperature
        probs = filter_logits(flat, options.top_k, options.top_p, options.min_p).softmax(-1)
        return flow_map(probs, codebook, per_step[:, step].reshape(b * k, dim)).view(b, k)

    ids, record = sample_ar(model, prefix, null_prefix, start_ids, n, token_range, options, None, progress,
                            choose=choose)
    record.sampler = "ar+flow_map"
    return ids, record


# ---- the student: one or two forward passes --------------------------------------------------------------
def split_mask(model, batch: int, num_tokens: int, split: int, device=None) -> torch.Tensor:
    """(b, N) bool in raster order: True for the first ``split`` positions of the model's sequence order
    (windows with Token-Shuffle, tokens otherwise); split counts positions of that order."""
    k = model.tokens_per_step
    order = torch.arange(num_tokens // k, device=device) < split           # per sequence position
    if k == 1:
        return order[None].expand(batch, -1).clone()
    return model.shuffle.to_raster(order[None, :, None].expand(batch, -1, k)).clone()


@torch.no_grad()
def sample_dd(student, prefix: torch.Tensor, start_ids: torch.Tensor, noise: torch.Tensor,
              token_range: tuple[int, int], codebook: torch.Tensor, steps: int = 1, split: int | None = None):
    """Noise (b, N, D) -> unified ids (b, N) in ``steps`` (1 or 2) forward passes of the student, and a record.

    Two steps: the first pass's tokens at the first ``split`` sequence positions (default: half) become data
    inputs, the remaining positions keep their noise, and the second pass writes every token."""
    if steps not in (1, 2):
        raise ValueError(f"Distilled Decoding runs 1 or 2 steps, got {steps}")
    b, n, dim = noise.shape
    lo, hi = token_range
    t0 = time.perf_counter()
    is_data = torch.zeros(b, n, dtype=torch.bool, device=noise.device)
    ids = student(prefix, start_ids, noise, is_data)[..., lo:hi].argmax(-1)
    if steps == 2:
        positions = n // student.model.tokens_per_step
        split = positions // 2 if split is None else split
        if not 0 < split < positions:
            raise ValueError(f"split must lie in (0, {positions}), got {split}")
        is_data = split_mask(student.model, b, n, split, noise.device)
        vectors = torch.where(is_data[..., None], codebook[ids].to(noise.dtype), noise)
        second = student(prefix, start_ids, vectors, is_data)[..., lo:hi].argmax(-1)
        ids = torch.where(is_data, ids, second)  # the data positions stay what the second pass was told
    seconds = time.perf_counter() - t0
    record = SamplingRecord(f"dd{steps}", b, n, steps, seconds, b * n / max(seconds, 1e-9), 0, 1.0)
    return ids + lo, record
