"""The one AR transformer: a Llama decoder (transformers' LlamaModel) plus what Llama lacks.

mmgen adds: the unified-vocabulary embedding with a modality embedding on top, a projector that turns
the frozen sentence encoder's token states into a fixed-length prefix (padding and dropped conditions use
a learnt null prefix, which is what classifier-free guidance samples against), and a head over the whole
vocabulary: one learnt row per id (``image_head: full``), or, over a binary tokenizer whose id is its bit
pattern, a bitwise head for the image range (``image_head: bitwise``, see ``MMGenTransformer.logits``).
Training and reference forwards go through LlamaModel; ``prefill``/``decode_step`` run the same
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
    byte_index: bool = False      # add a learnt embedding of each quoted byte's index in its text (see embed)
    glyph_head: bool = False      # a training-only head: the letter under each image token (see forward)
    image_head: str = "full"      # "full": a learnt logit row per image id; "bitwise": one logit per bit of the id
    image_bits: int = 0           # bitwise head: B, the image range holding 2^B ids (set from the tokenizer)


AR_CONFIGS = {
    "debug": ARConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      max_cond_tokens=48, max_positions=512),
    "small": ARConfig(hidden_size=192, num_layers=6, num_heads=6, num_kv_heads=3, intermediate_size=512),
    "base": ARConfig(),
    # for accelerator runs that see far more pages than the CPU budget (the text world on a GPU): 1.5x base's
    # width, 2.2x its parameters with the text vocabulary
    "medium": ARConfig(hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=3, intermediate_size=1024),
}
GLYPH_CLASSES = 128  # the glyph head's classes: ASCII, what the text world writes (0: no letter)
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
        if config.image_head == "full":
            self.lm_head = nn.Linear(d, self.vocab.size, bias=False)
        elif config.image_head == "bitwise":
            lo, hi = self.vocab.range("image")
            if config.image_bits <= 0 or hi - lo != 2 ** config.image_bits:
                raise ValueError(f"a bitwise image head needs an image range of 2^image_bits ids; the range holds "
                                 f"{hi - lo} and image_bits is {config.image_bits}")
            self.lm_head = nn.Linear(d, self.vocab.size - (hi - lo), bias=False)  # every id outside the range
            self.bit_head = nn.Linear(d, config.image_bits)
            nn.init.normal_(self.bit_head.weight, std=0.02)
            nn.init.zeros_(self.bit_head.bias)
            ids = torch.arange(hi - lo)
            # bit j of a local id (least significant first); derived, so not saved
            self.register_buffer("bit_table", ((ids[:, None] >> torch.arange(config.image_bits)) & 1).float(),
                                 persistent=False)
        else:
            raise ValueError(f"image_head must be 'full' or 'bitwise', got {config.image_head!r}")
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.head_dim = d // config.num_heads
        self.shuffle = (TokenShuffle(d, config.shuffle_window, tuple(config.shuffle_grid))
                        if config.shuffle_window > 1 else None)
        if config.byte_index:
            if config.text_bytes <= 0:
                raise ValueError("byte_index numbers the quoted text's bytes: it needs text_bytes > 0")
            self.byte_index_embed = nn.Embedding(config.text_bytes, d)
            nn.init.zeros_(self.byte_index_embed.weight)  # starts as the model without it
        if config.glyph_head:
            if config.text_bytes <= 0:
                raise ValueError("glyph_head predicts the quoted text's letters on the page: it needs text_bytes > 0")
            self.glyph_head = nn.Linear(d, GLYPH_CLASSES)
            nn.init.normal_(self.glyph_head.weight, std=0.02)
            nn.init.zeros_(self.glyph_head.bias)

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
        """Unified ids (b, t) -> token + modality embeddings (b, t, d).

        With ``byte_index`` each byte also gets a learnt embedding of its index among the row's bytes, i.e. in
        the quoted text (0 for its first byte): the slot is left-padded, so rotary positions alone tell an image
        position how far back a byte lies, not which letter of the text it is; the index lets attention find
        "letter k" by content. Only for rows whose bytes are the quoted text (the draw task; training refuses
        it with captions as bytes)."""
        x = self.llama.embed_tokens(ids) + self.modality_embed(1 + self.vocab.modality_of(ids))
        if self.config.byte_index and ids.dim() == 2:
            lo, hi = self.vocab.range("byte")
            is_byte = (ids >= lo) & (ids < hi)
            index = (is_byte.long().cumsum(1) - 1).clamp(0, self.config.text_bytes - 1)
            x = x + self.byte_index_embed(index) * is_byte[..., None]
        return x

    def embed_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids written by one sampling step -> input embeddings: (b,) -> (b, 1, d), or with Token-Shuffle a
        window (b, s*s) -> (b, 1, d)."""
        if self.shuffle is None:
            return self.embed(ids.reshape(ids.shape[0], 1))
        return self.shuffle.merge(self.embed(ids.reshape(ids.shape[0], 1, -1)))

    def token_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., d) -> the states the head reads: the same, or with Token-Shuffle one
        state per token of the next window (..., s*s, d)."""
        if self.shuffle is None:
            return hidden
        squeeze = hidden.dim() == 2
        out = self.shuffle.split(hidden[:, None] if squeeze else hidden)
        return out[:, 0] if squeeze else out

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Head states (..., d) -> logits over the unified vocabulary (..., vocab).

        The bitwise head (Infinity's bitwise classifier, Han et al. 2024, over a tokenizer whose id is its bit
        pattern) predicts one logit l_j per bit and gives image id t the logit sum_j bit_j(t) l_j: the softmax
        over the image range then factorises into independent bits, p(bit j = 1) = sigmoid(l_j). It is a
        linear head whose rows are tied to the bit table, so every sampler (guidance, temperature, top-k)
        works on these logits unchanged; training never builds them (``loss``). How it differs from
        Infinity: the bits share one softmax with the ids outside the image range (bytes, specials), which a
        small learnt head scores, so the loss is one exact cross-entropy over the whole vocabulary."""
        if self.config.image_head == "full":
            return self.lm_head(states)
        lo, _ = self.vocab.range("image")
        other = self.lm_head(states)
        image = self.bit_head(states) @ self.bit_table.T
        return torch.cat([other[..., :lo], image, other[..., lo:]], -1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., d) -> logits (..., vocab), or (..., s*s, vocab) with Token-Shuffle."""
        return self.logits(self.token_states(hidden))

    def loss(self, states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of unified ids ``target`` (...) from head states (..., d); -100 is ignored.

        Equal to cross-entropy on ``logits(states)``. The bitwise head never builds the 2^B image logits: their
        log-sum-exp is sum_j softplus(l_j) and a target's logit is its bits dotted with l, so a token costs B
        + (ids outside the image range) outputs instead of the whole vocabulary."""
        states, target = states.reshape(-1, states.shape[-1]), target.reshape(-1)
        if self.config.image_head == "full":
            return F.cross_entropy(self.lm_head(states), target)
        keep = target != -100
        states, target = states[keep], target[keep]
        lo, hi = self.vocab.range("image")
        other, bits = self.lm_head(states), self.bit_head(states)
        log_z = torch.logaddexp(F.softplus(bits).sum(-1), torch.logsumexp(other, -1))
        is_image = (target >= lo) & (target < hi)
        image_logit = (self.bit_table[(target - lo).clamp(0, hi - lo - 1)] * bits).sum(-1)
        other_index = torch.where(target < lo, target, target - (hi - lo)).clamp(0, other.shape[-1] - 1)
        other_logit = other.gather(-1, other_index[:, None])[:, 0]
        return (log_z - torch.where(is_image, image_logit, other_logit)).mean()

    def image_logits(self, prefix: torch.Tensor, start_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for every image token, raster order: (b, N, vocab).

        prefix (b, p, d), start_ids (b, S) (e.g. <boi>), image_ids (b, N) unified ids in the tokenizer's order."""
        return self.logits(self.image_states(prefix, start_ids, image_ids))

    def image_states(self, prefix: torch.Tensor, start_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced head states for every image token, raster order: (b, N, d) (see ``image_logits``)."""
        if self.shuffle is None:
            ids = torch.cat([start_ids, image_ids[:, :-1]], 1)
            return self.states(prefix, ids)[:, start_ids.shape[1] - 1:]
        windows = self.shuffle.to_windows(image_ids)                     # (b, n, s*s)
        x = torch.cat([prefix, self.embed(start_ids), self.shuffle.merge(self.embed(windows[:, :-1]))], 1)
        if x.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds max_positions={self.config.max_positions}")
        h = self.llama(inputs_embeds=x, use_cache=False).last_hidden_state
        h = h[:, prefix.shape[1] + start_ids.shape[1] - 1:]              # (b, n, d), already final-normed
        return self.shuffle.to_raster(self.token_states(h))

    # ---- reference forward (training) -------------------------------------------------------------------
    def forward(self, prefix: torch.Tensor, ids: torch.Tensor, image_ids: torch.Tensor | None = None,
                target: torch.Tensor | None = None, glyph_target: torch.Tensor | None = None):
        """prefix (b, p, d), ids (b, t) -> logits (b, t, vocab): position i predicts ids[:, i + 1].

        With ``image_ids`` (b, N), ``ids`` are the start ids and this is ``image_logits``. With ``target`` (the
        ids the logits would be scored against, -100 ignored) it returns their mean cross-entropy instead
        (``loss``), without the logits. Training goes through here, which also works under
        DistributedDataParallel (it only syncs what goes through forward).

        ``glyph_target`` (b, N), with ``image_ids`` and ``target`` and a model built with ``glyph_head``: the
        letter (its ASCII byte; 0 off the text's lines) drawn over each image token's cell, raster order (the
        text world's ``glyph_map``). Returns (the image loss, the glyph loss): the cross-entropy of the glyph
        head's reading of each token's head state against the letter, over the cells on a line (spaces
        included). The state that must draw a token is asked which letter it is drawing; only the quoted bytes
        can tell it where a glyph's first strokes are drawn, so this is a direct signal to read them (teacher-
        forced, the image tokens before a cell already show most of its letter). Inference never runs the
        head. Akin in aim to TextDiffuser's character-aware loss, not its method: there a trained character
        segmenter scores the denoised image; here the letter supervises the state that draws the token."""
        states = self.image_states(prefix, ids, image_ids) if image_ids is not None else self.states(prefix, ids)
        if glyph_target is None:
            return self.logits(states) if target is None else self.loss(states, target)
        if not self.config.glyph_head or image_ids is None or target is None:
            raise ValueError("glyph_target needs a model built with glyph_head, image_ids and target")
        # a weighted mean rather than a selection of the cells on a line: selecting would read their count back
        # from an accelerator each step
        glyph_target = glyph_target.reshape(-1).long()
        on_line = (glyph_target > 0).float()
        per_cell = F.cross_entropy(self.glyph_head(states.reshape(-1, states.shape[-1])), glyph_target,
                                   reduction="none")
        return self.loss(states, target), (per_cell * on_line).sum() / on_line.sum().clamp(min=1.0)

    def states(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """prefix (b, p, d), ids (b, t) -> final-normed hidden states (b, t, d) of the ids' positions."""
        x = torch.cat([prefix, self.embed(ids)], dim=1)
        if x.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds max_positions={self.config.max_positions}")
        return self.llama(inputs_embeds=x, use_cache=False).last_hidden_state[:, prefix.shape[1]:]

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
            if self.config.image_head == "bitwise":
                n -= self.bit_head.weight.numel() + self.bit_head.bias.numel()
        return n


def _chunk_mask(t: int, start: int, device) -> torch.Tensor:
    """Causal mask for t new queries after ``start`` cached positions: (t, start + t) bool."""
    q = torch.arange(start, start + t, device=device)[:, None]
    k = torch.arange(start + t, device=device)[None]
    return k <= q
