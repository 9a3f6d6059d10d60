"""ZipVL (arXiv 2410.08584, version 1): one signal, the attention mass a token receives, decides both which
tokens the prefill attends with and at what precision each token's keys and values are cached.

Per layer and per input:

1. **Probe queries**: the last 5 % of positions plus a seeded random 5 % of the others, at least
   ``min_probes`` (32; every position in shorter inputs: 6 probes for a 49-position text-to-image prefill
   made the selection noisy enough to drop shapes-eval from 0.73 to 0.48 in a one-off run on 48 canonical
   prompts, not a repo command). Their attention
   probabilities give each key's received mass, divided by the number of probe queries that can see it under
   the causal mask (early keys are seen by every probe, late ones by few; without the division early tokens
   win by position alone). Summed over heads: the selection is per token, shared by all heads of the layer.
2. **Important-token ratio**: keys sorted by normalised mass; the important set is the smallest one whose
   cumulative share reaches ``tau``. The ratio is whatever that gives for this layer and this input.
3. **Sparse prefill** (``sparse_causal_attention``): every query attends to the important keys at or before it
   (causal by original position), in query chunks so that each chunk only reads the keys it can see; the
   cost is about the kept ratio times dense causal attention, plus the probes. *Positions outside the
   important set* are not attended to in that layer (together they held at most 1 - tau of the probes'
   mass), but as queries they still attend over the important keys, so their hidden states keep being
   updated and the cache gets sensible keys and values for them (stored at low precision). Position 0 is
   always kept, so no query is left with nothing to attend to. The paper restricts the queries too (only
   important tokens attend, to one another, p^2 instead of n p); on this small model that left the skipped
   positions' states unattended and their later-layer keys corrupt: ``benchmarks/zipvl.py --quick`` measured
   text-to-image shapes-eval 0.75 dense against 0.29 at tau 0.975 with that variant.
4. **Mixed-precision KV cache** (``ZipVLLayer``, a transformers cache layer): after prefill, important tokens
   are stored at ``high_bits`` (4), the others at ``low_bits`` (2); keys quantised per channel, values per
   token after dividing each channel by the square root of its largest magnitude (ZipCache's
   channel-separable token-wise scheme); codes packed into uint8. Tokens written while decoding stay in full
   precision in a recent buffer; every ``recent`` (100) steps the buffer is compressed, its important set
   chosen the same way from the attention mass the decoding queries gave it.

Where mmgen's version differs from the paper's: all queries attend (item 3), a floor on the probe count
(item 1); the paper runs FlashAttention kernels and, in version 2, drops the other tokens from the cache;
mmgen follows version 1 (mixed precision, nothing dropped), runs on the CPU through PyTorch's SDPA, and
loops over the batch because each input has its own set. ``tau >= 1`` keeps every token, which is the dense model exactly (a test checks it).

Plugged into transformers through its extension points: the attention is registered with
``AttentionInterface`` as ``mmgen_zipvl`` together with a mask function under the same name in
``AttentionMaskInterface`` (a plain causal prefill needs no mask, which is how the attention function
recognises the prefill it sparsifies), and the cache is a ``transformers.Cache`` of ``ZipVLLayer`` layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "mmgen_zipvl"
SUPPORTED_BITS = (2, 4, 8, 16)  # 16: kept in the compute dtype, not quantised


@dataclass
class ZipVLOptions:
    tau: float = 0.975          # share of the normalised attention mass the important set must reach
    high_bits: int = 4          # KV bits of important tokens
    low_bits: int = 2           # KV bits of the others
    probe_frac: float = 0.05    # probes: the last probe_frac of positions + a random probe_frac of the rest
    min_probes: int = 32        # at least this many probes (all positions when fewer): short inputs need them
    recent: int = 100           # decoding steps kept in full precision before the buffer is compressed
    seed: int = 0               # the random probes' seed

    def validate(self) -> "ZipVLOptions":
        if not (0.0 < self.tau <= 1.0):
            raise ValueError(f"ZipVL tau must lie in (0, 1], got {self.tau}")
        for name in ("high_bits", "low_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"ZipVL {name} must be one of {SUPPORTED_BITS}, got {getattr(self, name)}")
        if self.low_bits > self.high_bits:
            raise ValueError(f"ZipVL low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})")
        if not (0.0 < self.probe_frac <= 0.5):
            raise ValueError(f"ZipVL probe_frac must lie in (0, 0.5], got {self.probe_frac}")
        if self.min_probes < 1:
            raise ValueError(f"ZipVL min_probes must be >= 1, got {self.min_probes}")
        if self.recent < 1:
            raise ValueError(f"ZipVL recent must be >= 1, got {self.recent}")
        return self

    @staticmethod
    def parse_bits(text: str) -> tuple[int, int]:
        """'4/2' -> (4, 2): important / other tokens' KV bits."""
        try:
            hi, lo = (int(x) for x in str(text).split("/"))
        except ValueError:
            raise ValueError(f"ZipVL kv bits must look like '4/2' (important/other), got {text!r}") from None
        ZipVLOptions(high_bits=hi, low_bits=lo).validate()
        return hi, lo


# ---- important tokens -----------------------------------------------------------------------------------
def probe_positions(n: int, frac: float, generator: torch.Generator | None = None, min_probes: int = 1
                    ) -> torch.Tensor:
    """Sorted probe query positions: the last ceil(frac n) and a random ceil(frac n) of the rest, at least
    ``min_probes`` in all (half last, half random; every position when n is that small)."""
    if n <= min_probes:
        return torch.arange(n)
    m = max(1, math.ceil(frac * n), math.ceil(min_probes / 2))
    last = torch.arange(max(0, n - m), n)
    rest = n - len(last)
    if rest == 0:
        return last
    pick = torch.randperm(rest, generator=generator)[:min(m, rest)]
    return torch.cat([pick.sort().values, last])


def received_mass(query: torch.Tensor, key: torch.Tensor, probes: torch.Tensor, scaling: float,
                  chunk: int = 64) -> torch.Tensor:
    """Each key's attention mass from the probe queries, normalised by how many probes can see it: (b, n).

    query (b, h, n, hd), key (b, kv_heads, n, hd) (grouped-query attention allowed), probes (m,) sorted
    positions. Probes go in chunks, each reading only the keys it can see, so the probabilities never have
    to exist for all probes at once."""
    b, h, n, hd = query.shape
    kvh, g = key.shape[1], query.shape[1] // key.shape[1]
    probes = probes.to(query.device)
    mass = query.new_zeros(b, n)
    for c0 in range(0, len(probes), chunk):
        pc = probes[c0:c0 + chunk]
        width = int(pc[-1]) + 1                                                   # keys this chunk can see
        qp = query[:, :, pc].reshape(b, kvh, g * len(pc), hd)                     # query head j reads kv head j // g
        scores = torch.matmul(qp, key[:, :, :width].transpose(-1, -2))            # (b, kvh, g * mc, width)
        visible = torch.arange(width, device=query.device)[None] <= pc[:, None]   # (mc, width)
        bias = torch.zeros(len(pc), width, dtype=scores.dtype, device=scores.device).masked_fill_(~visible,
                                                                                                float("-inf"))
        mass[:, :width] += (scores.mul_(scaling) + bias.repeat(g, 1)).softmax(-1).sum(dim=(1, 2))
    seen = (torch.arange(n, device=query.device)[None] <= probes[:, None]).sum(0)
    return mass / seen.clamp_min(1) / h


def important_mask(score: torch.Tensor, tau: float) -> torch.Tensor:
    """The smallest set of tokens per row whose share of ``score`` (b, n) reaches tau: bool (b, n).

    Monotone in tau (the same order, a larger count); tau >= 1 keeps everything."""
    if tau >= 1.0:
        return torch.ones_like(score, dtype=torch.bool)
    share = score / score.sum(-1, keepdim=True).clamp_min(1e-30)
    sorted_share, order = share.sort(-1, descending=True)
    count = ((sorted_share.cumsum(-1) < tau).sum(-1, keepdim=True) + 1).clamp_max(score.shape[-1])
    rank_keep = torch.arange(score.shape[-1], device=score.device)[None] < count
    return torch.zeros_like(rank_keep).scatter(-1, order, rank_keep)


def sparse_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                            scaling: float, chunk: int = 512) -> torch.Tensor:
    """Every query attends to the kept keys at or before it: (b, h, n, hd). keep (b, n) bool.

    Queries go in chunks; a chunk reads only the kept keys before its end, with a causal mask for the keys
    inside it. A query that sees no kept key gets zeros (ZipVL keeps position 0, so that never happens there)."""
    b, h, n, hd = query.shape
    out = query.new_zeros(query.shape)
    pos = torch.arange(n, device=query.device)
    for r in range(b):
        idx = keep[r].nonzero().squeeze(1)                                        # kept positions, in order
        k_sel, v_sel = key[r:r + 1, :, idx], value[r:r + 1, :, idx]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            upto = int(torch.searchsorted(idx, e))                                # kept keys before e
            if upto == 0:
                continue
            mask = idx[None, :upto] <= pos[s:e, None]                             # (e - s, upto)
            o = F.scaled_dot_product_attention(query[r:r + 1, :, s:e], k_sel[:, :, :upto], v_sel[:, :, :upto],
                                               attn_mask=mask, scale=scaling, enable_gqa=True)
            out[r, :, s:e] = torch.where(mask.any(-1)[None, :, None], o[0], 0.0)
    return out


# ---- quantisation ---------------------------------------------------------------------------------------
@dataclass
class QTensor:
    """Uniform asymmetric codes packed into uint8 along the last axis, with their scale and offset.

    ``x ~= (codes * scale + low) * channel`` (``channel`` only for values)."""
    codes: torch.Tensor                 # uint8 (..., d * bits / 8), or the raw tensor when bits == 16
    scale: torch.Tensor | None
    low: torch.Tensor | None
    bits: int
    dim: int                            # the unpacked last-axis size
    channel: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        parts = [self.codes, self.scale, self.low, self.channel]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.bits == 16:
            return self.codes.to(dtype)
        x = _unpack(self.codes, self.bits, self.dim).to(dtype) * self.scale + self.low
        return x * self.channel if self.channel is not None else x


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.uint8)
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    return (c << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], dim)


def quantize(x: torch.Tensor, bits: int, stat_dim: int, channel: torch.Tensor | None = None) -> QTensor:
    """Min-max quantise x (..., d) to ``bits``; scale and offset are shared along ``stat_dim`` (-2: per channel
    over tokens, the keys' scheme; -1: per token over channels, the values' scheme). Error per element is at
    most scale / 2 = range / (2 (2^bits - 1)) (of x / channel when a channel scale is given)."""
    if bits == 16:
        return QTensor(x.clone(), None, None, 16, x.shape[-1])
    if x.shape[-1] % (8 // bits):
        raise ValueError(f"last axis {x.shape[-1]} does not pack at {bits} bits")
    y = x / channel if channel is not None else x
    low, high = y.amin(stat_dim, keepdim=True), y.amax(stat_dim, keepdim=True)
    scale = ((high - low) / (2 ** bits - 1)).clamp_min(1e-8)
    codes = torch.round((y - low) / scale).clamp_(0, 2 ** bits - 1)
    return QTensor(_pack(codes, bits), scale, low, bits, x.shape[-1], channel)


def quantize_keys(k: torch.Tensor, bits: int) -> QTensor:
    """Keys (..., n, hd): per-channel statistics (keys have outlier channels, so channels get their own range)."""
    return quantize(k, bits, stat_dim=-2)


def quantize_values(v: torch.Tensor, bits: int) -> QTensor:
    """Values (..., n, hd): channels divided by sqrt(max |v|) first, then per-token statistics (ZipCache)."""
    if bits == 16:
        return quantize(v, 16, -1)
    channel = v.abs().amax(-2, keepdim=True).sqrt().clamp_min(1e-6)
    return quantize(v, bits, stat_dim=-1, channel=channel)


# ---- the cache ------------------------------------------------------------------------------------------
class ZipVLLayer(CacheLayerMixin):
    """One layer's mixed-precision cache: one prefill, then single-token decoding.

    Per batch row, a list of quantised groups (each with its own bit width, shapes (kv_heads, n_g, hd)) plus a
    full-precision buffer of the tokens written since the last compression. Decoding attends over all of them
    in storage order: a single new query sees every cached token, so the order does not matter."""
    is_sliding = False
    is_compileable = False

    def __init__(self, options: ZipVLOptions):
        super().__init__()
        self.options = options
        self.groups: list[list[tuple[QTensor, QTensor]]] = []
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # prefill keys/values until compressed
        self.buf_k = self.buf_v = None                                   # (b, kvh, nb, hd)
        self.buf_mass = None                                             # (b, nb) summed decode attention
        self.buf_seen = None                                             # (nb,) decode queries that saw each
        self.length = 0
        self.kept_ratio: float | None = None                             # prefill's important share (batch mean)
        self.high_tokens = 0                                             # tokens stored at high_bits (all rows)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b = key_states.shape[0]
        self.groups = [[] for _ in range(b)]
        self.buf_k = key_states[:, :, :0].clone()
        self.buf_v = value_states[:, :, :0].clone()
        self.buf_mass = key_states.new_zeros(b, 0)
        self.buf_seen = key_states.new_zeros(0)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        if t > 1 or self.length == 0:
            if self.length:
                raise ValueError("a ZipVL cache takes one prefill, then one token per step")
            self.pending = (key_states, value_states)
            self.length = t
            return key_states, value_states
        self.buf_k = torch.cat([self.buf_k, key_states], 2)
        self.buf_v = torch.cat([self.buf_v, value_states], 2)
        self.buf_mass = torch.cat([self.buf_mass, self.buf_mass.new_zeros(self.buf_mass.shape[0], 1)], 1)
        self.buf_seen = torch.cat([self.buf_seen, self.buf_seen.new_zeros(1)])
        self.length += 1
        return self.full_keys_values()

    def full_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows_k, rows_v = [], []
        for r, groups in enumerate(self.groups):
            rows_k.append(torch.cat([g[0].dequantize(self.dtype) for g in groups] + [self.buf_k[r]], 1))
            rows_v.append(torch.cat([g[1].dequantize(self.dtype) for g in groups] + [self.buf_v[r]], 1))
        return torch.stack(rows_k), torch.stack(rows_v)

    def _store(self, k: torch.Tensor, v: torch.Tensor, important: torch.Tensor) -> None:
        """Quantise k, v (b, kvh, n, hd) into each row's groups: important tokens at high bits, others at low."""
        o = self.options
        for r in range(k.shape[0]):
            for mask, bits in ((important[r], o.high_bits), (~important[r], o.low_bits)):
                idx = mask.nonzero().squeeze(1)
                if len(idx):
                    self.groups[r].append((quantize_keys(k[r][:, idx], bits), quantize_values(v[r][:, idx], bits)))
            self.high_tokens += int(important[r].sum())

    def compress_prefill(self, important: torch.Tensor) -> None:
        k, v = self.pending
        self.pending = None
        self.kept_ratio = float(important.float().mean())
        self._store(k, v, important)

    def observe(self, probs_on_buffer: torch.Tensor) -> None:
        """Add one decoding query's attention (b, nb) (summed over heads) on the buffer; compress when full."""
        self.buf_mass += probs_on_buffer
        self.buf_seen += 1
        if self.buf_k.shape[2] >= self.options.recent:
            important = important_mask(self.buf_mass / self.buf_seen, self.options.tau)
            self._store(self.buf_k, self.buf_v, important)
            self._reset_buffer()

    def _reset_buffer(self) -> None:
        self.buf_k, self.buf_v = self.buf_k[:, :, :0].clone(), self.buf_v[:, :, :0].clone()
        self.buf_mass, self.buf_seen = self.buf_mass[:, :0].clone(), self.buf_seen[:0].clone()

    @property
    def nbytes(self) -> int:
        n = sum(q.nbytes for groups in self.groups for g in groups for q in g)
        n += sum(t.numel() * t.element_size() for t in (self.buf_k, self.buf_v) if t is not None)
        if self.pending is not None:
            n += sum(t.numel() * t.element_size() for t in self.pending)
        return n

    @property
    def dense_nbytes(self) -> int:
        """What a dense cache in the compute dtype would hold for the same tokens."""
        if self.buf_k is None:
            return 0
        b, kvh, _, hd = self.buf_k.shape
        return 2 * b * kvh * hd * self.length * self.buf_k.element_size()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.options)


class ZipVLCache(Cache):
    """A transformers ``Cache`` with one ``ZipVLLayer`` per model layer; ``stats()`` for the sampling record."""

    def __init__(self, num_layers: int, options: ZipVLOptions | None = None):
        self.options = (options or ZipVLOptions()).validate()
        super().__init__(layers=[ZipVLLayer(self.options) for _ in range(num_layers)])
        self.generator = torch.Generator().manual_seed(self.options.seed)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes for layer in self.layers)

    def stats(self) -> dict:
        return {"tau": self.options.tau, "kv_bits": f"{self.options.high_bits}/{self.options.low_bits}",
                "kept_ratio_per_layer": [round(l.kept_ratio, 4) if l.kept_ratio is not None else None
                                         for l in self.layers],
                "kv_bytes": self.nbytes, "dense_kv_bytes": self.dense_nbytes}


# ---- the attention function and its mask ----------------------------------------------------------------
def zipvl_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs):
    """``AttentionInterface`` function: sparse prefill and compressed decoding when ``zipvl_cache`` (a
    ``ZipVLCache``) comes in the kwargs; plain SDPA otherwise. Returns (b, t, h, hd), None."""
    cache = kwargs.get("zipvl_cache")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    b, h, t, hd = query.shape
    n = key.shape[2]
    layer = cache.layers[module.layer_idx] if isinstance(cache, ZipVLCache) else None
    if layer is not None and layer.pending is not None and t == n and attention_mask is None:  # fresh prefill
        if cache.options.tau >= 1.0 or t == 1:
            keep = torch.ones(b, n, dtype=torch.bool, device=query.device)
            out = F.scaled_dot_product_attention(query, key, value, is_causal=t > 1, scale=scaling, enable_gqa=True)
        else:
            probes = probe_positions(n, cache.options.probe_frac, cache.generator, cache.options.min_probes)
            keep = important_mask(received_mass(query, key, probes, scaling), cache.options.tau)
            keep[:, 0] = True  # every query sees at least one kept key
            out = sparse_causal_attention(query, key, value, keep, scaling)
        layer.compress_prefill(keep)
        return out.transpose(1, 2).contiguous(), None
    if layer is not None and t == 1:                                          # decoding over the compressed cache
        kvh = key.shape[1]
        scores = torch.matmul(query.reshape(b, kvh, h // kvh, hd), key.transpose(-1, -2)) * scaling  # (b,kvh,g,n)
        probs = scores.softmax(-1)
        out = torch.matmul(probs, value).reshape(b, h, 1, hd)
        nb = layer.buf_k.shape[2]
        layer.observe(probs[..., n - nb:].sum(dim=(1, 2)))
        return out.transpose(1, 2).contiguous(), None
    o = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                       is_causal=attention_mask is None and t > 1, scale=scaling, enable_gqa=True)
    return o.transpose(1, 2).contiguous(), None


# The mask: SDPA's own. It returns None for a plain causal prefill or a single decoding query, which is how
# zipvl_attention recognises the prefill it sparsifies (it applies causality itself).
AttentionInterface.register(ATTENTION_NAME, zipvl_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
