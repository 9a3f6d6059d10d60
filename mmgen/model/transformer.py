"""The one AR transformer: a Llama decoder (transformers' LlamaModel) plus what Llama lacks.

mmgen adds: the unified-vocabulary embedding with a modality embedding on top, a projector that turns
the frozen sentence encoder's token states into a fixed-length prefix (padding and dropped conditions use
a learnt null prefix, which is what classifier-free guidance samples against), and a head over the whole
vocabulary. Training and reference forwards go through LlamaModel; ``prefill``/``decode_step`` run the same
weights with a preallocated KV cache and no per-step mask building, which is what makes decoding fast on a
CPU (tests check them against the LlamaModel forward).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel

from mmgen.model.token_shuffle import TokenShuffle
from mmgen.model.vocab import Vocabulary
from mmgen.model.zipvl import ATTENTION_NAME as ZIPVL_ATTENTION, ZipVLCache, ZipVLOptions
from mmgen.tokenizers.base import CheckpointError, load_part, load_state_strict, save_part


@dataclass
class ARConfig:
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    cond_dim: int = 384           # sentence-encoder hidden size
    max_cond_tokens: int = 48     # prefix length (sentence-encoder word pieces)
    max_positions: int = 1024
    rope_theta: float = 10000.0
    vocab: dict = field(default_factory=dict)  # Vocabulary.to_dict()
    shuffle_window: int = 1       # Token-Shuffle window s (1: one position per token, the plain model)
    shuffle_grid: tuple = (0, 0)  # the image token grid (H, W) the windows tile; set from the tokenizer
    text_bytes: int = 0           # quoted prompt text as byte tokens, a slot of this many bytes (0: off)


AR_CONFIGS = {
    "debug": ARConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      max_cond_tokens=48, max_positions=512),
    "small": ARConfig(hidden_size=192, num_layers=6, num_heads=6, num_kv_heads=3, intermediate_size=512),
    "base": ARConfig(),
}
MODALITY_NAMES = ("condition",)  # index 0 is the prefix; vocabulary ranges follow in their order


@dataclass
class KVCache:
    """Preallocated keys and values: (layers, b, kv_heads, max_len, head_dim); ``length`` positions filled."""
    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    cos: torch.Tensor | None = None    # (max_len, head_dim) rotary tables, built on first use
    sin: torch.Tensor | None = None
    fused: list | None = None          # per layer (W_qkv, W_gate_up), built on first use

    @property
    def nbytes(self) -> int:
        per_pos = self.keys[:, :, :, :1].numel() * self.keys.element_size() * 2
        return per_pos * self.length


class MMGenTransformer(nn.Module):
    def __init__(self, config: ARConfig):
        super().__init__()
        if not config.vocab:
            raise ValueError("ARConfig.vocab is empty: build it with Vocabulary.build(...).to_dict()")
        self.config = config
        self.vocab = Vocabulary.from_dict(config.vocab)
        d = config.hidden_size
        self.llama_config = LlamaConfig(
            vocab_size=self.vocab.size, hidden_size=d, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_positions,
            rope_theta=config.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa",
            attention_bias=False, mlp_bias=False)  # the fused fast path assumes bias-free projections
        self.llama = LlamaModel(self.llama_config)
        self.modality_embed = nn.Embedding(1 + len(self.vocab.ranges), d)
        nn.init.zeros_(self.modality_embed.weight)
        self.cond_proj = nn.Sequential(nn.LayerNorm(config.cond_dim), nn.Linear(config.cond_dim, d), nn.SiLU(),
                                       nn.Linear(d, d))
        self.null_cond = nn.Parameter(torch.randn(config.max_cond_tokens, d) * 0.02)
        self.lm_head = nn.Linear(d, self.vocab.size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.head_dim = d // config.num_heads
        self.shuffle = (TokenShuffle(d, config.shuffle_window, tuple(config.shuffle_grid))
                        if config.shuffle_window > 1 else None)

    @property
    def tokens_per_step(self) -> int:
        """Image tokens one forward pass writes (s^2 with Token-Shuffle, else 1)."""
        return self.shuffle.tokens_per_window if self.shuffle is not None else 1

    # ---- embeddings -------------------------------------------------------------------------------------
    def prefix(self, states: torch.Tensor | None, mask: torch.Tensor | None, batch: int | None = None,
               drop: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence-encoder states (b, n, cond_dim) + mask -> prefix embeddings (b, max_cond_tokens, d).

        ``states=None`` gives the unconditional (null) prefix; ``drop`` (b,) bool drops rows to it."""
        n_max = self.config.max_cond_tokens
        null = self.null_cond.unsqueeze(0)
        if states is None:
            return null.expand(batch, -1, -1) + self.modality_embed.weight[0]
        b, n, _ = states.shape
        if n > n_max:
            raise ValueError(f"condition has {n} tokens, the model takes at most {n_max}")
        null = null.expand(b, -1, -1)
        proj = torch.cat([self.cond_proj(states), null[:, n:]], dim=1)
        keep = torch.cat([mask, torch.zeros(b, n_max - n, dtype=torch.bool, device=mask.device)], 1)
        if drop is not None:
            keep = keep & ~drop[:, None]
        return torch.where(keep[..., None], proj, null) + self.modality_embed.weight[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Unified ids (b, t) -> token + modality embeddings (b, t, d)."""
        return self.llama.embed_tokens(ids) + self.modality_embed(1 + self.vocab.modality_of(ids))

    def embed_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids written by one sampling step -> input embeddings: (b,) -> (b, 1, d), or with Token-Shuffle a
        window (b, s*s) -> (b, 1, d)."""
        if self.shuffle is None:
            return self.embed(ids.reshape(ids.shape[0], 1))
        return self.shuffle.merge(self.embed(ids.reshape(ids.shape[0], 1, -1)))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., d) -> logits (..., vocab), or (..., s*s, vocab) with Token-Shuffle."""
        if self.shuffle is None:
            return self.lm_head(hidden)
        squeeze = hidden.dim() == 2
        h = hidden[:, None] if squeeze else hidden
        out = self.lm_head(self.shuffle.split(h))
        return out[:, 0] if squeeze else out

    def image_logits(self, prefix: torch.Tensor, start_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for every image token, raster order: (b, N, vocab).

        prefix (b, p, d), start_ids (b, S) (e.g. <boi>), image_ids (b, N) unified ids in the tokenizer's order."""
        if self.shuffle is None:
            ids = torch.cat([start_ids, image_ids[:, :-1]], 1)
            return self.forward(prefix, ids)[:, start_ids.shape[1] - 1:]
        windows = self.shuffle.to_windows(image_ids)                     # (b, n, s*s)
        x = torch.cat([prefix, self.embed(start_ids), self.shuffle.merge(self.embed(windows[:, :-1]))], 1)
        if x.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds max_positions={self.config.max_positions}")
        h = self.llama(inputs_embeds=x, use_cache=False).last_hidden_state
        h = h[:, prefix.shape[1] + start_ids.shape[1] - 1:]              # (b, n, d), already final-normed
        return self.shuffle.to_raster(self.head(h))

    # ---- reference forward (training) -------------------------------------------------------------------
    def forward(self, prefix: torch.Tensor, ids: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """prefix (b, p, d), ids (b, t) -> logits (b, t, vocab): position i predicts ids[:, i + 1].

        With ``image_ids`` (b, N), ``ids`` are the start ids and this is ``image_logits`` (the training entry
        that also works under DistributedDataParallel, which only syncs what goes through forward)."""
        if image_ids is not None:
            return self.image_logits(prefix, ids, image_ids)
        x = torch.cat([prefix, self.embed(ids)], dim=1)
        if x.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds max_positions={self.config.max_positions}")
        h = self.llama(inputs_embeds=x, use_cache=False).last_hidden_state
        return self.lm_head(h[:, prefix.shape[1]:])

    # ---- fast inference path ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype=torch.float32, zipvl: ZipVLOptions | None = None):
        """A preallocated ``KVCache`` for the fast path, or with ``zipvl`` options a ``ZipVLCache`` (sparse
        prefill, mixed-precision cache) that runs through transformers' Llama layers."""
        c = self.config
        if max_len > c.max_positions:
            raise ValueError(f"{max_len} positions exceed max_positions={c.max_positions}")
        if zipvl is not None:
            return ZipVLCache(c.num_layers, zipvl)
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, self.head_dim)
        dev = self.lm_head.weight.device
        return KVCache(torch.empty(shape, dtype=dtype, device=dev), torch.empty(shape, dtype=dtype, device=dev))

    def _run(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run x (b, t, d) at positions cache.length.. with the Llama layers' own weights; returns logits of
        the last position (b, vocab).

        Same arithmetic as LlamaModel (tests compare them), leaner: q/k/v and gate/up projections fused into
        one matmul each, rotary tables built once per cache, 2-D activations, no per-step mask building."""
        b, t, d = x.shape
        start, end = cache.length, cache.length + t
        if cache.fused is None:
            self._prepare_cache(cache, x)
        cos, sin = cache.cos[start:end], cache.sin[start:end]  # (t, hd), broadcast over (b, heads, t, hd)
        hd, nh, nkv = self.head_dim, self.config.num_heads, self.config.num_kv_heads
        eps = self.llama_config.rms_norm_eps
        x = x.reshape(b * t, d)
        for i, layer in enumerate(self.llama.layers):
            w_qkv, w_gate_up = cache.fused[i]
            h = F.rms_norm(x, (d,), layer.input_layernorm.weight, eps)
            qkv = F.linear(h, w_qkv).view(b, t, nh + 2 * nkv, hd).transpose(1, 2)  # (b, heads, t, hd)
            qk = qkv[:, :nh + nkv]
            qk = qk * cos + qk.roll(hd // 2, -1) * sin  # RoPE; rotate_half's sign lives in the sin table
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
            cache.keys[i, :, :, start:end] = k
            cache.values[i, :, :, start:end] = v
            keys, values = cache.keys[i, :, :, :end], cache.values[i, :, :, :end]
            if t == 1 or start == 0:  # one new position sees the whole cache; a fresh prefill is plain causal
                o = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=_chunk_mask(t, start, x.device),
                                                   enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(b * t, d), layer.self_attn.o_proj.weight)
            gate, up = F.linear(F.rms_norm(x, (d,), layer.post_attention_layernorm.weight, eps), w_gate_up).chunk(2, -1)
            x = x + F.linear(layer.mlp.act_fn(gate) * up, layer.mlp.down_proj.weight)
        cache.length = end
        last = x.view(b, t, d)[:, -1]
        return self.head(F.rms_norm(last, (d,), self.llama.norm.weight, eps))

    def _run_zipvl(self, x: torch.Tensor, cache: ZipVLCache) -> torch.Tensor:
        """Run x (b, t, d) through transformers' LlamaModel with ZipVL's attention and cache; logits of the last
        position. The attention implementation is switched for this call only (training stays on SDPA)."""
        previous = self.llama.config._attn_implementation
        self.llama.config._attn_implementation = ZIPVL_ATTENTION
        try:
            h = self.llama(inputs_embeds=x, cache=cache, use_cache=True, zipvl_cache=cache).last_hidden_state
        finally:
            self.llama.config._attn_implementation = previous
        return self.head(h[:, -1])

    def _prepare_cache(self, cache: KVCache, x: torch.Tensor) -> None:
        """Rotary tables for every cache position and fused projection weights (current weights)."""
        pos = torch.arange(cache.keys.shape[3], device=x.device)[None]
        cos, sin = self.llama.rotary_emb(x, pos)
        half = self.head_dim // 2
        cache.cos = cos[0]
        cache.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)
        cache.fused = [(torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight]),
                        torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight])) for l in self.llama.layers]

    @torch.no_grad()
    def prefill(self, prefix: torch.Tensor, ids: torch.Tensor, cache, image_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """prefix (b, p, d) + ids (b, s) (e.g. <boi>) [+ image_ids (b, N): the first N image tokens in raster
        order, an image to continue; with Token-Shuffle N covers whole rows of windows] -> next logits."""
        x = torch.cat([prefix, self.embed(ids)], dim=1)
        if image_ids is not None and image_ids.shape[1]:
            if self.shuffle is None:
                x = torch.cat([x, self.embed(image_ids)], 1)
            else:
                x = torch.cat([x, self.shuffle.merge(self.embed(self.shuffle.to_windows(image_ids, partial=True)))], 1)
        return self._run_zipvl(x, cache) if isinstance(cache, ZipVLCache) else self._run(x, cache)

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (b,) -> logits (b, vocab) for the next position; with Token-Shuffle a window (b, s*s) ->
        logits (b, s*s, vocab) for the next window."""
        x = self.embed_step(ids)
        return self._run_zipvl(x, cache) if isinstance(cache, ZipVLCache) else self._run(x, cache)

    # ---- save / load ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        save_part(directory, {"type": "mmgen_ar", **asdict(self.config)}, self.state_dict(), dtype)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "MMGenTransformer":
        cfg, state = load_part(directory, expected_type="mmgen_ar")
        fields = {k: cfg[k] for k in ARConfig.__dataclass_fields__ if k in cfg}
        if "shuffle_grid" in fields:
            fields["shuffle_grid"] = tuple(fields["shuffle_grid"])
        try:
            model = cls(ARConfig(**fields))
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{directory}/config.json describes no valid model: {e}") from e
        load_state_strict(model, state, str(Path(directory)))
        return model.eval()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.llama.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        return n


def _chunk_mask(t: int, start: int, device) -> torch.Tensor:
    """Causal mask for t new queries after ``start`` cached positions: (t, start + t) bool."""
    q = torch.arange(start, start + t, device=device)[:, None]
    k = torch.arange(start + t, device=device)[None]
    return k <= q
