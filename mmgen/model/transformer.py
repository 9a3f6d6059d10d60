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
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mmgen.model.vocab import Vocabulary
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
            rope_theta=config.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa")
        self.llama = LlamaModel(self.llama_config)
        self.modality_embed = nn.Embedding(1 + len(self.vocab.ranges), d)
        nn.init.zeros_(self.modality_embed.weight)
        self.cond_proj = nn.Sequential(nn.LayerNorm(config.cond_dim), nn.Linear(config.cond_dim, d), nn.SiLU(),
                                       nn.Linear(d, d))
        self.null_cond = nn.Parameter(torch.randn(config.max_cond_tokens, d) * 0.02)
        self.lm_head = nn.Linear(d, self.vocab.size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.head_dim = d // config.num_heads

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

    # ---- reference forward (training) -------------------------------------------------------------------
    def forward(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """prefix (b, p, d), ids (b, t) -> logits (b, t, vocab): position i predicts ids[:, i + 1]."""
        x = torch.cat([prefix, self.embed(ids)], dim=1)
        if x.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds max_positions={self.config.max_positions}")
        h = self.llama(inputs_embeds=x, use_cache=False).last_hidden_state
        return self.lm_head(h[:, prefix.shape[1]:])

    # ---- fast inference path ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype=torch.float32) -> KVCache:
        c = self.config
        if max_len > c.max_positions:
            raise ValueError(f"{max_len} positions exceed max_positions={c.max_positions}")
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, self.head_dim)
        dev = self.lm_head.weight.device
        return KVCache(torch.empty(shape, dtype=dtype, device=dev), torch.empty(shape, dtype=dtype, device=dev))

    def _run(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run x (b, t, d) at positions cache.length.. with the Llama layers' own weights; returns logits of
        the last position (b, vocab)."""
        b, t, _ = x.shape
        start = cache.length
        pos = torch.arange(start, start + t, device=x.device).unsqueeze(0)
        cos, sin = self.llama.rotary_emb(x, pos)
        for i, layer in enumerate(self.llama.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, heads, t, hd)
            k = attn.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.keys[i, :, :, start:start + t] = k
            cache.values[i, :, :, start:start + t] = v
            keys, values = cache.keys[i, :, :, :start + t], cache.values[i, :, :, :start + t]
            # a prefill starting at 0 is plain causal; a single decoded position sees the whole cache
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=(t > 1 and start == 0),
                                               enable_gqa=True) if (t == 1 or start == 0) else \
                F.scaled_dot_product_attention(q, keys, values, attn_mask=_chunk_mask(t, start, x.device),
                                               enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.length = start + t
        return self.lm_head(self.llama.norm(x[:, -1]))

    @torch.no_grad()
    def prefill(self, prefix: torch.Tensor, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self._run(torch.cat([prefix, self.embed(ids)], dim=1), cache)

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (b,) -> logits (b, vocab) for the next position."""
        return self._run(self.embed(ids[:, None]), cache)

    # ---- save / load ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        save_part(directory, {"type": "mmgen_ar", **asdict(self.config)}, self.state_dict(), dtype)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "MMGenTransformer":
        cfg, state = load_part(directory, expected_type="mmgen_ar")
        fields = {k: cfg[k] for k in ARConfig.__dataclass_fields__ if k in cfg}
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
