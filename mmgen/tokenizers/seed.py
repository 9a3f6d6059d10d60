"""SEED: a one-dimensional, causal, semantic image tokenizer with a diffusion decoder (arXiv 2307.08041).

image -> frozen CLIP ViT patch features (``clip_shapes.ShapesCLIP``, trained on the world) -> causal
Q-Former (``num_queries`` learned queries; causal self-attention among the queries, cross-attention to the
features) -> one code per query from an l2-normalised VQ codebook -> ``num_queries`` ids, read left to right
like words (layout ``causal1d``).

Decoding: a small transformer turns the code vectors back into the causal embeddings and an attention-pooled
MLP into the CLIP image embedding (SEED's "generation embedding"); a diffusers ``UNet2DConditionModel``
cross-attends to both and denoises, with a DDIM scheduler, the latent of the project's patch VQ autoencoder
(``vae``), whose decoder paints the pixels (latent diffusion, as SEED's Stable Diffusion decoder is).

Training follows the paper's two stages at small scale (``mmgen.train.seed``, ``docs/seed.md``):
1. the Q-Former's final causal embedding is aligned with the caption by a contrastive loss;
2. the codebook is learnt: codes -> reconstructed causal embeddings (cosine) and -> CLIP image embedding
   (cosine), plus the VQ commitment loss.
Changes, all measured by the model card rather than assumed harmless (SEED starts from BLIP-2's pretrained
Q-Former; this one starts from scratch on a CPU):
- The caption side of the stage-1 contrastive loss is a small word-level encoder trained with the Q-Former
  (``CaptionEncoder``; SEED aligns with BLIP-2's text transformer), and each image also has to beat a
  hard-negative caption (the same scene with one attribute changed).
- Stage 1 also has BLIP-2's image-grounded caption generation (``CaptionDecoder``: the reading-order
  caption word by word from the 32 causal embeddings) and the same caption slot by slot
  (``CaptionSlots``), a form that trains in CPU minutes.
- The Q-Former adds a learnt position embedding at unit scale to the ViT features before cross-attention
  (the ViT's own position signal was not readable by attention). With ``clip_class_token`` it also sees the
  ViT's class token, as BLIP-2's Q-Former sees every ViT output token (open_clip returns the patch tokens
  only).
- In stage 2 the Q-Former keeps training (SEED freezes it) and the stage-1 losses are also asked of the
  embeddings reconstructed from the codes, so the 32 codes themselves carry the caption; the
  causal-embedding reconstruction target is detached.
- The codebook has ``codebook_size`` entries (1024 by default; the paper's 8192 is for natural images).
- The generation embedding is this CLIP's image embedding, not unCLIP-SD's, and the diffusion decoder is
  trained here on the world with the tokenizer frozen.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmgen.tokenizers.base import (CheckpointError, TokenLayout, Tokenizer, load_part, save_part)
from mmgen.tokenizers.clip_shapes import ShapesCLIP, contrastive
from mmgen.tokenizers.quantizers import VectorQuantizer
from mmgen.tokenizers.vq_image import VQImageTokenizer, images_to_tensor, tensor_to_images


@dataclass
class SEEDConfig:
    image_size: int = 64
    num_queries: int = 32
    width: int = 192
    layers: int = 3
    heads: int = 4
    feature_dim: int = 192       # CLIP ViT width (taken from the CLIP at build time)
    embed_dim: int = 128         # CLIP joint embedding size (taken from the CLIP)
    clip_class_token: bool = False  # the Q-Former also cross-attends to the ViT's class token (BLIP-2 sees all tokens)
    clip_crops: int = 0          # also the tokens of n x n overlapping crops, upsampled (ShapesCLIP.crop_views); 0: off
    codebook_size: int = 1024
    code_dim: int = 32
    beta: float = 0.25
    decoder_layers: int = 2
    align_dim: int = 128          # joint space of the stage-1 alignment (caption encoder <-> final causal query)
    caption_words: tuple = ()     # the caption encoder's word list (built from the world's phrasings when empty)
    # the diffusion decoder
    unet_channels: tuple = (64, 128, 192)
    unet_heads: int = 4
    latent_scale: float = 2.8284  # VAE latents are unit code vectors; sqrt(code_dim) gives unit variance per entry
    train_timesteps: int = 1000
    sample_steps: int = 25
    guidance_scale: float = 3.0
    cond_drop: float = 0.1


SEED_CONFIGS = {
    "debug": SEEDConfig(num_queries=8, width=32, layers=1, heads=2, codebook_size=64, code_dim=8, decoder_layers=1,
                        unet_channels=(16, 32, 32), unet_heads=2, sample_steps=4),
    "base": SEEDConfig(),
}


class QFormerBlock(nn.Module):
    """Pre-norm block: causal self-attention among the queries, cross-attention to the image features, MLP.

    With ``crops`` a second cross-attention reads the crop views' features, its output scaled by tanh of a
    gate that starts at 0 (Flamingo's gated cross-attention, arXiv 2204.14198): a block added to a trained
    Q-Former starts as the identity, so its ids start where they were, and the gate opens as far as the
    crops help."""

    def __init__(self, width: int, heads: int, crops: bool = False):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        if crops:
            self.ln_crop = nn.LayerNorm(width)
            self.crop_attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.crop_gate = nn.Parameter(torch.zeros(()))

    def forward(self, q: torch.Tensor, feats: torch.Tensor, causal: torch.Tensor,
                crop_feats: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln1(q)
        q = q + self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        q = q + self.cross_attn(self.ln2(q), feats, feats, need_weights=False)[0]
        if crop_feats is not None:
            q = q + torch.tanh(self.crop_gate) * self.crop_attn(self.ln_crop(q), crop_feats, crop_feats,
                                                                need_weights=False)[0]
        return q + self.mlp(self.ln3(q))


def world_caption_words() -> tuple[str, ...]:
    """Every word the shapes world's captions use (training and held-out phrasings), sorted."""
    import random
    import re

    from mmgen.worlds import shapes

    words = set()
    rng = random.Random(0)
    for s in shapes.generate(3000, seed=0, paraphrase=True):
        words.update(re.findall(r"[a-z]+", s.caption.lower()))
        words.update(re.findall(r"[a-z]+", shapes.paraphrase_caption(s.objects, s.background, rng, True).lower()))
    return tuple(sorted(words))


class CaptionEncoder(nn.Module):
    """The text side of stage-1 alignment (SEED trains BLIP-2's Q-Former text transformer here): word
    embeddings over the world's caption words (unknown words share one id), a small transformer, attention
    pooling, a projection into the alignment space. Used in training only; it never sees the AR model."""

    def __init__(self, c: SEEDConfig, width: int = 128, layers: int = 2, max_words: int = 48):
        super().__init__()
        self.index = {w: i + 2 for i, w in enumerate(c.caption_words)}  # 0: pad, 1: unknown
        self.max_words = max_words
        self.embed = nn.Embedding(len(c.caption_words) + 2, width, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_words, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool_query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pool = nn.MultiheadAttention(width, 4, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, c.align_dim))

    def ids(self, captions: list[str]) -> torch.Tensor:
        import re

        rows = [[self.index.get(w, 1) for w in re.findall(r"[a-z]+", c.lower())][:self.max_words] for c in captions]
        out = torch.zeros(len(rows), max(1, max(len(r) for r in rows)), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.pos.device)

    def forward(self, captions: list[str]) -> torch.Tensor:
        ids = self.ids(captions)
        pad = ids == 0
        h = self.body(self.embed(ids) + self.pos[:ids.shape[1]], src_key_padding_mask=pad)
        pooled = self.pool(self.pool_query.expand(len(ids), -1, -1), h, h, key_padding_mask=pad,
                           need_weights=False)[0][:, 0]
        return F.normalize(self.out(pooled), dim=-1)


class CaptionDecoder(nn.Module):
    """BLIP-2's image-grounded text generation (ITG), which SEED's Q-Former inherits: a small transformer
    decoder writes the caption word by word, cross-attending to the 32 causal embeddings. Its dense per-word
    loss is what makes the queries carry every attribute the caption names (a contrastive loss alone gave
    position at chance on this world). Training only; shares the caption encoder's word list."""

    def __init__(self, c: SEEDConfig, width: int = 128, layers: int = 2, max_words: int = 48):
        super().__init__()
        self.bos = len(c.caption_words) + 2
        self.embed = nn.Embedding(len(c.caption_words) + 3, width, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_words + 1, width) * 0.02)
        self.memory = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, width))
        layer = nn.TransformerDecoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.body = nn.TransformerDecoder(layer, layers)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(c.caption_words) + 2))

    def forward(self, word_ids: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """word ids (b, n) (0 = pad) + causal embeddings (b, q, width) -> (loss, word accuracy)."""
        b, n = word_ids.shape
        inp = torch.cat([torch.full((b, 1), self.bos, device=word_ids.device), word_ids[:, :-1]], 1)
        mask = torch.ones(n, n, dtype=torch.bool, device=word_ids.device).triu(1)
        h = self.body(self.embed(inp) + self.pos[:n], self.memory(emb), tgt_mask=mask)
        logits = self.head(h)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), word_ids.reshape(-1), ignore_index=0)
        real = word_ids != 0
        acc = ((logits.argmax(-1) == word_ids) & real).sum() / real.sum().clamp(min=1)
        return loss, acc


def named_weights(weights: dict | None, names: tuple[str, ...], key: str, what: str) -> dict[str, float]:
    """A recipe's ``{name: weight}`` table -> a weight for every name (unnamed ones 1.0); a clear error for an
    unknown name or a weight that is not a non-negative number."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"unknown {key} {what}(s) {unknown}; known: {list(names)}")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights.values()):
        raise ValueError(f"{key} must be non-negative numbers: {weights!r}")
    return {n: float(weights.get(n, 1.0)) for n in names}


class CaptionSlots(nn.Module):
    """Caption prediction in the world's caption grammar, slot by slot: for each of up to three objects in
    reading order its size, colour, shape and cell (or "none"), and the background, read from the causal
    embeddings by four learnt slot queries. It carries the same information as the word-level caption
    (``CaptionDecoder``) but as one classification per slot, a loss that trains in CPU minutes; the word-level
    generation alone had left positions at chance after 400 steps. Training only."""

    def __init__(self, c: SEEDConfig):
        super().__init__()
        from mmgen.worlds import shapes

        self.colors, self.shapes, self.sizes = list(shapes.COLORS), list(shapes.SHAPES), list(shapes.SIZES)
        self.backgrounds = list(shapes.BACKGROUNDS)
        self.queries = nn.Parameter(torch.randn(4, c.width) * 0.02)
        self.attn = nn.MultiheadAttention(c.width, c.heads, batch_first=True)
        self.ln = nn.LayerNorm(c.width)
        n_obj = (len(self.colors) + 1) + (len(self.shapes) + 1) + (len(self.sizes) + 1) + 10
        self.obj_head = nn.Sequential(nn.Linear(c.width, 2 * c.width), nn.GELU(), nn.Linear(2 * c.width, n_obj))
        self.bg_head = nn.Linear(c.width, len(self.backgrounds))
        self.weights = {a: 1.0 for a in self.ATTRIBUTES}  # per-attribute loss weights (training setting, not saved)

    ATTRIBUTES = ("color", "shape", "size", "cell", "background")

    def set_weights(self, weights: dict | None) -> None:
        """Weight each attribute's loss (``training.slot_weights`` in a SEED recipe; unnamed ones stay 1)."""
        self.weights = named_weights(weights, self.ATTRIBUTES, "slot_weights", "attribute")

    def targets(self, scenes) -> torch.Tensor:
        """scenes: (objects, background) pairs -> (b, 13) class ids (-1: not applicable)."""
        rows = []
        for objects, bg in scenes:
            objs = sorted(objects, key=lambda o: o.cell)
            row = []
            for k in range(3):
                if k < len(objs):
                    o = objs[k]
                    row += [self.colors.index(o.color), self.shapes.index(o.shape), self.sizes.index(o.size), o.cell]
                else:
                    row += [len(self.colors), len(self.shapes), len(self.sizes), 9]  # "none"
            rows.append(row + [self.backgrounds.index(bg)])
        return torch.tensor(rows, dtype=torch.long)

    def logits(self, emb: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Causal embeddings (b, q, width) -> ((colour, shape, size, cell) logits, each (b, 3, classes + none),
        background logits (b, backgrounds))."""
        h = self.ln(self.attn(self.queries.expand(emb.shape[0], -1, -1), emb, emb, need_weights=False)[0])
        sizes = [len(self.colors) + 1, len(self.shapes) + 1, len(self.sizes) + 1, 10]
        return self.obj_head(h[:, :3]).split(sizes, dim=-1), self.bg_head(h[:, 3])

    def forward(self, emb: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss, share of slots right)."""
        parts, bg_logits = self.logits(emb)
        target = target.to(emb.device)
        losses, right = [], []
        for a, logits in enumerate(parts):
            t = target[:, a:12:4]                                       # (b, 3)
            losses.append(self.weights[self.ATTRIBUTES[a]]
                          * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1)))
            right.append((logits.argmax(-1) == t).float().mean())
        losses.append(self.weights["background"] * F.cross_entropy(bg_logits, target[:, 12]))
        right.append((bg_logits.argmax(-1) == target[:, 12]).float().mean())
        return sum(losses), sum(right) / len(right)


class CausalQFormer(nn.Module):
    """``num_features`` tokens per view; with ``crops`` views after the first, every block also reads those
    (``QFormerBlock``'s gated crop cross-attention). ``feat_pos`` holds every view's position rows."""

    def __init__(self, c: SEEDConfig, num_features: int = 64, crops: int = 0):
        super().__init__()
        self.view_tokens = num_features
        num_features = num_features * (1 + crops)
        self.feat_proj = nn.Sequential(nn.LayerNorm(c.feature_dim), nn.Linear(c.feature_dim, c.width))
        # where each ViT patch sits, added again before cross-attention: the features' own position signal
        # fades through the ViT (a contrastive CLIP barely needs it), and captions name positions
        # at unit scale, so position is readable from the first step (at 0.02 a slot-prediction probe
        # reached 0.68 of slots in 150 steps, at 1.0 0.76)
        self.feat_pos = nn.Parameter(torch.randn(num_features, c.width))
        self.queries = nn.Parameter(torch.randn(c.num_queries, c.width) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(c.width, c.heads, crops > 0) for _ in range(c.layers))
        self.ln_out = nn.LayerNorm(c.width)
        n = c.num_queries
        self.register_buffer("causal", torch.ones(n, n, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(b, n_patches, feature_dim) -> causal embeddings (b, num_queries, width); query i sees queries <= i."""
        if features.shape[1] != self.feat_pos.shape[0]:
            raise ValueError(f"the Q-Former reads {self.feat_pos.shape[0]} feature tokens, got {features.shape[1]}")
        f = self.feat_proj(features) + self.feat_pos
        whole, crops = f[:, :self.view_tokens], (f[:, self.view_tokens:] if f.shape[1] > self.view_tokens else None)
        q = self.queries.unsqueeze(0).expand(f.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(q, whole, self.causal, crops)
        return self.ln_out(q)


class CodeDecoder(nn.Module):
    """Code vectors -> reconstructed causal embeddings (a small transformer) and generation embedding."""

    def __init__(self, c: SEEDConfig):
        super().__init__()
        self.inp = nn.Linear(c.code_dim, c.width)
        self.pos = nn.Parameter(torch.randn(c.num_queries, c.width) * 0.02)
        layer = nn.TransformerEncoderLayer(c.width, c.heads, 4 * c.width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.body = nn.TransformerEncoder(layer, c.decoder_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(c.width)
        self.pool_query = nn.Parameter(torch.randn(1, 1, c.width) * 0.02)
        self.pool = nn.MultiheadAttention(c.width, c.heads, batch_first=True)
        self.gen_head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, 2 * c.width), nn.GELU(),
                                      nn.Linear(2 * c.width, c.embed_dim))

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln(self.body(self.inp(codes) + self.pos))
        pooled = self.pool(self.pool_query.expand(h.shape[0], -1, -1), h, h, need_weights=False)[0][:, 0]
        return h, self.gen_head(pooled)


class SEEDDiffusionDecoder(nn.Module):
    """diffusers UNet2DConditionModel over the VAE's latent grid, cross-attending to the SEED condition
    (the reconstructed causal embeddings plus the projected generation embedding); classifier-free guidance
    against a learnt null condition."""

    def __init__(self, c: SEEDConfig, latent_channels: int, latent_size: int):
        super().__init__()
        from diffusers import UNet2DConditionModel

        ch = tuple(c.unet_channels)
        self.unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            layers_per_block=1, block_out_channels=ch,
            down_block_types=("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1),
            cross_attention_dim=c.width, attention_head_dim=c.unet_heads, norm_num_groups=min(16, ch[0]))
        self.gen_proj = nn.Linear(c.embed_dim, c.width)
        self.null = nn.Parameter(torch.randn(c.num_queries + 1, c.width) * 0.02)
        self.c = c

    def scheduler_config(self) -> dict:
        return dict(num_train_timesteps=self.c.train_timesteps, beta_schedule="squaredcos_cap_v2",
                    prediction_type="v_prediction", clip_sample=False)

    def condition(self, recon: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        return torch.cat([recon, self.gen_proj(gen)[:, None]], 1)

    def loss(self, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """v-prediction loss on VAE latents (b, c, h, w) (already scaled); drops ``cond_drop`` of the conditions."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(**self.scheduler_config())
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        t = torch.randint(0, self.c.train_timesteps, (b,), generator=generator, device=latents.device)
        drop = torch.rand(b, generator=generator, device=latents.device) < self.c.cond_drop
        cond = torch.where(drop[:, None, None], self.null.expand(b, -1, -1), cond)
        noisy = sched.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred, sched.get_velocity(latents, noise, t))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None,
               steps: int | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from seeded noise -> latents (b, c, h, w) (scaled)."""
        from diffusers import DDIMScheduler

        steps = steps or self.c.sample_steps
        g = self.c.guidance_scale if guidance_scale is None else guidance_scale
        sched = DDIMScheduler(**self.scheduler_config())
        sched.set_timesteps(steps)
        b = cond.shape[0]
        if isinstance(generator, (list, tuple)):  # one generator per image
            if len(generator) != b:
                raise ValueError(f"got {len(generator)} generators for {b} images")
            x = torch.stack([torch.randn(shape, generator=g) for g in generator]).to(cond.device)
        else:
            x = torch.randn((b, *shape), generator=generator, device=cond.device)
        both = torch.cat([cond, self.null.expand(b, -1, -1)]) if g != 1.0 else cond
        for t in sched.timesteps:
            inp = torch.cat([x, x]) if g != 1.0 else x
            out = self.unet(inp, t, encoder_hidden_states=both).sample
            if g != 1.0:
                c_out, u_out = out.chunk(2)
                out = u_out + g * (c_out - u_out)
            x = sched.step(out, t, x).prev_sample
        return x


class SEEDTokenizer(Tokenizer):
    """Images -> (b, num_queries) causal ids; ids -> images through the diffusion decoder (when trained)."""

    type_name = "seed"
    decode_needs_generator = True  # the diffusion decoder starts from seeded noise

    def __init__(self, config: SEEDConfig, clip: ShapesCLIP, vae: VQImageTokenizer | None = None,
                 with_decoder: bool = False):
        super().__init__()
        if clip.image_size != config.image_size:
            raise ValueError(f"CLIP takes {clip.image_size}px images, SEED config says {config.image_size}")
        if vae is not None and vae.config.image_size != config.image_size:
            raise ValueError(f"the VAE takes {vae.config.image_size}px images, SEED config says {config.image_size}")
        config.feature_dim, config.embed_dim = clip.feature_dim, clip.embed_dim
        if not config.caption_words:
            config.caption_words = world_caption_words()
        config.caption_words = tuple(config.caption_words)
        self.config = config
        self.clip = clip.eval().requires_grad_(False)
        if not 0 <= int(config.clip_crops) <= 4:
            raise ValueError(f"clip_crops must be 0 (off) to 4, got {config.clip_crops}")
        patches = (clip.image_size // int(clip.model_cfg["vision_cfg"]["patch_size"])) ** 2
        self.qformer = CausalQFormer(config, patches + int(config.clip_class_token), int(config.clip_crops) ** 2)
        self.caption_encoder = CaptionEncoder(config)
        self.caption_decoder = CaptionDecoder(config)
        self.caption_slots = CaptionSlots(config)
        self.align_proj = nn.Linear(config.width, config.align_dim)
        self.align_logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature
        self.to_code = nn.Linear(config.width, config.code_dim)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.beta)
        self.code_decoder = CodeDecoder(config)
        self.caption_loss_weights = {k: 1.0 for k in self.CAPTION_LOSSES}
        self.layout = TokenLayout("causal1d", (config.num_queries,))
        self.vocab_size = config.codebook_size
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.diffusion = None
        if with_decoder:
            if vae is None:
                raise ValueError("the diffusion decoder needs the VAE whose latents it denoises")
            g = vae.layout.grid
            self.diffusion = SEEDDiffusionDecoder(config, vae.config.code_dim, g[0])

    CAPTION_LOSSES = ("align", "itg", "slots")

    def set_caption_loss_weights(self, weights: dict | None) -> None:
        """Weight the caption losses (``training.caption_loss_weights``: align, itg, slots; unnamed ones stay 1;
        a zero skips that loss's computation). A training setting, not saved."""
        full = named_weights(weights, self.CAPTION_LOSSES, "caption_loss_weights", "loss")
        if not any(full.values()):
            raise ValueError("caption_loss_weights turns every caption loss off")
        self.caption_loss_weights = full

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen towers never switch to training behaviour
        if self.vae is not None:
            self.vae.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.to_code.weight.device

    # ---- tokens ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_features(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen CLIP's tokens the Q-Former reads (the image's, then each crop's with ``clip_crops``) and
        the whole image's CLIP embedding."""
        return self.clip.multicrop_features(images, int(self.config.clip_crops), self.config.clip_class_token)

    def causal_embeddings(self, images) -> torch.Tensor:
        return self.qformer(self.clip_features(images)[0])

    def quantize(self, emb: torch.Tensor):
        """Causal embeddings (b, n, width) -> (code vectors (b, n, code_dim), ids (b, n), vq loss, perplexity)."""
        z = rearrange(self.to_code(emb), "b n d -> b d 1 n")
        q = self.quantizer(z)
        return rearrange(q.quantized, "b d 1 n -> b n d"), q.ids[:, 0], q.loss, q.perplexity

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images (PIL, uint8 array or (b, 3, 64, 64) in [0, 1]) -> (b, num_queries) ids, causal order."""
        return self.quantize(self.causal_embeddings(images))[1]

    def code_vectors(self) -> torch.Tensor:
        return self.quantizer.codebook().detach()

    def embed_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (b, n) -> (reconstructed causal embeddings, generation embedding)."""
        n = self.config.num_queries
        if ids.dim() != 2 or ids.shape[1] != n:
            raise ValueError(f"SEED ids must be (batch, {n}), got {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"SEED ids must lie in [0, {self.vocab_size})")
        return self.code_decoder(self.quantizer.codebook()[ids.to(self.device)])

    # ---- training losses (through forward, so DDP syncs them) ----------------------------------------
    def alignment_loss(self, emb: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive loss between the final causal embedding and the caption embeddings (normalised; rows
        past the batch are hard negatives)."""
        img = F.normalize(self.align_proj(emb[:, -1]), dim=-1)
        return contrastive(img, text, self.align_logit_scale.clamp(max=4.6052).exp())

    def forward(self, images, captions, stage: int, negatives=None, described=None, scenes=None):
        """-> (loss, metrics). Stage 1: the final causal embedding aligned with the caption (hard-negative
        captions ``negatives`` ranked too), image-grounded generation of ``described`` (the reading-order
        caption) from the 32 causal embeddings, and, given ``scenes``, the caption slot by slot. Stage 2 adds
        the VQ loss and the reconstruction of the causal embeddings and of the CLIP image embedding from the
        codes, and asks the caption losses of the embeddings reconstructed from the codes too, so the 32 codes
        themselves carry the caption."""
        feats, img_emb = self.clip_features(images)
        text = self.caption_encoder(list(captions) + list(negatives or []))
        words = self.caption_encoder.ids(list(described if described is not None else captions))
        slots = self.caption_slots.targets(scenes) if scenes is not None else None
        emb = self.qformer(feats)

        w = self.caption_loss_weights

        def caption_losses(e, tag):
            loss, row = e.new_zeros(()), {}
            if w["align"]:
                align, acc = self.alignment_loss(e, text)
                loss = loss + w["align"] * align
                row.update({f"align{tag}": align.item(), f"acc{tag}": acc.item()})
            if w["itg"]:
                itg, word_acc = self.caption_decoder(words, e)
                loss = loss + w["itg"] * itg
                row.update({f"itg{tag}": itg.item(), f"word_acc{tag}": word_acc.item()})
            if slots is not None and w["slots"]:
                slot_loss, slot_acc = self.caption_slots(e, slots)
                loss = loss + w["slots"] * slot_loss
                row.update({f"slots{tag}": slot_loss.item(), f"slot_acc{tag}": slot_acc.item()})
            return loss, row

        loss, row = caption_losses(emb, "")
        if stage == 1:
            return loss, row
        codes, _, vq, ppl = self.quantize(emb)
        recon, gen = self.code_decoder(codes)
        rec = (1 - F.cosine_similarity(recon, emb.detach(), dim=-1)).mean()
        gen_loss = (1 - F.cosine_similarity(gen, img_emb, dim=-1)).mean()
        loss_q, row_q = caption_losses(recon, "_codes")
        return loss + loss_q + vq + rec + gen_loss, {**row, **row_q, "vq": vq.item(), "rec": rec.item(),
                                                     "gen": gen_loss.item(), "ppl": ppl.item()}

    @torch.no_grad()
    def decoder_targets(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (SEED ids (b, num_queries), VAE code ids (b, h, w)): all the decoder learns from, so a
        trainer can compute them once and reuse them (the frozen CLIP, Q-Former and VAE encoder cost as much
        as a decoder step)."""
        x = images_to_tensor(images).to(self.device)
        return self.encode(x), self.vae.quantizer(self.vae.encoder(x * 2 - 1)).ids

    def decoder_loss_from_ids(self, ids: torch.Tensor, vae_ids: torch.Tensor,
                              generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion decoder's loss on ``decoder_targets`` (tokenizer and VAE frozen)."""
        with torch.no_grad():
            recon, gen = self.embed_ids(ids)
            latents = self.vae.quantizer.embed(vae_ids) * self.config.latent_scale
        return self.diffusion.loss(latents, self.diffusion.condition(recon, gen), generator)

    def decoder_loss(self, images, generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion decoder's loss on images (tokenizer and VAE frozen)."""
        return self.decoder_loss_from_ids(*self.decoder_targets(images), generator)

    # ---- pixels ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, ids: torch.Tensor, generator: torch.Generator | None = None, steps: int | None = None,
               guidance_scale: float | None = None) -> torch.Tensor:
        """(b, num_queries) ids -> images (b, 3, 64, 64) in [0, 1]: DDIM in the VAE latent space, each latent
        vector snapped to the VAE codebook, the VAE decoder paints. Deterministic for a seeded generator."""
        if self.diffusion is None:
            raise CheckpointError("this SEED tokenizer has no trained diffusion decoder (train seed-decoder)")
        recon, gen = self.embed_ids(ids)
        cond = self.diffusion.condition(recon, gen)
        g = self.vae.layout.grid
        lat = self.diffusion.sample(cond, (self.vae.config.code_dim, g[0], g[1]), generator, steps, guidance_scale)
        q = self.vae.quantizer(lat / self.config.latent_scale)
        return ((self.vae.decoder(q.quantized) + 1) / 2).clamp(0, 1)

    def decode_images(self, ids: torch.Tensor, generator: torch.Generator | None = None, **kw):
        return tensor_to_images(self.decode(ids, generator, **kw))

    # ---- save / load ----------------------------------------------------------------------------------
    def _own_state(self) -> dict:
        skip = ("clip.", "vae.", "diffusion.unet.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        directory = Path(directory)
        cfg = {"type": self.type_name, "layout": self.layout.to_dict(), "has_decoder": self.diffusion is not None,
               **asdict(self.config)}
        save_part(directory, cfg, self._own_state(), dtype)
        self.clip.save_pretrained(directory / "clip", dtype)
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae", dtype)
        if self.diffusion is not None:
            unet = self.diffusion.unet
            if dtype is not None:  # a converted copy: the live model keeps computing in fp32
                import copy

                unet = copy.deepcopy(unet).to(dtype)
            unet.save_pretrained(directory / "unet", safe_serialization=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, with_decoder: bool | None = None) -> "SEEDTokenizer":
        directory = Path(directory)
        cfg, state = load_part(directory, expected_type=cls.type_name)
        fields = {k: cfg[k] for k in SEEDConfig.__dataclass_fields__ if k in cfg}
        for key in ("unet_channels", "caption_words"):
            if key in fields:
                fields[key] = tuple(fields[key])
        has_dec = bool(cfg.get("has_decoder")) if with_decoder is None else with_decoder
        clip = ShapesCLIP.from_pretrained(directory / "clip")
        vae = VQImageTokenizer.from_pretrained(directory / "vae") if (directory / "vae").is_dir() else None
        try:
            tok = cls(SEEDConfig(**fields), clip, vae, with_decoder=has_dec)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}/config.json describes no valid SEED tokenizer: {e}") from e
        own = tok._own_state()
        if has_dec:
            from diffusers import UNet2DConditionModel

            unet_dir = directory / "unet"
            if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
                raise CheckpointError(f"{directory} says it has a diffusion decoder but {unet_dir} holds no "
                                      "diffusion_pytorch_model.safetensors")
            unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
            tok.diffusion.unet = unet.float()
        else:
            state = {k: v for k, v in state.items() if not k.startswith("diffusion.")}
        missing = set(own) ^ set(state)
        if missing:
            raise CheckpointError(f"weights in {directory} do not match its config: {sorted(missing)[:5]}")
        tok.load_state_dict({**tok.state_dict(), **state}, strict=True)
        return tok.eval()
