"""What a CLIP can tell apart: for fresh one-object world images, does the true caption outscore every caption
that changes exactly one attribute (colour, shape, size, position, background)? Per attribute, the share of
images for which it does. This is how the project checks its CLIP judge and SEED's vision tower."""
from __future__ import annotations

import numpy as np
import torch

from mmgen.worlds import shapes

PROBE_SEED = 920_001


def _variants(s, attr: str):
    o = s.objects[0]
    if attr == "background":
        return [(o, b) for b in shapes.BACKGROUNDS], list(shapes.BACKGROUNDS).index(s.background)
    values = {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES), "size": list(shapes.SIZES),
              "cell": list(range(9))}[attr]
    base = dict(color=o.color, shape=o.shape, size=o.size, cell=o.cell)
    return ([(shapes.ShapeObject(**{**base, attr: v}), s.background) for v in values],
            values.index(getattr(o, attr)))


ATTRIBUTES = ("color", "shape", "size", "cell", "background")


def _retrieval(samples, img, encode_text) -> dict:
    """Per attribute, the share of images (embeddings ``img``) whose true caption outscores every variant."""
    result = {}
    for attr in ATTRIBUTES:
        right = 0
        for i, s in enumerate(samples):
            options, truth = _variants(s, attr)
            txt = encode_text([shapes.canonical_caption([obj], bg) for obj, bg in options])
            right += int((txt @ img[i]).argmax()) == truth
        result[attr] = right / len(samples)
    return result


@torch.no_grad()
def seed_attribute_retrieval(tokenizer, n: int = 100, seed: int = PROBE_SEED) -> dict:
    """The same probe for a SEED tokenizer, read from its 32 codes: the embedding reconstructed from the
    quantised tokens is scored against each caption variant through the stage-1 alignment heads."""
    import torch.nn.functional as F

    samples = list(shapes.generate(n, seed, size=tokenizer.config.image_size, num_objects=1))
    recon, _ = tokenizer.embed_ids(tokenizer.encode([s.image for s in samples]))
    img = F.normalize(tokenizer.align_proj(recon[:, -1]), dim=-1)
    return _retrieval(samples, img, tokenizer.caption_encoder)


@torch.no_grad()
def attribute_retrieval(clip, n: int = 100, seed: int = PROBE_SEED) -> dict:
    samples = list(shapes.generate(n, seed, size=clip.image_size, num_objects=1))
    return _retrieval(samples, clip.encode_image([s.image for s in samples]), clip.encode_text)


def seed_code_probe(tokenizer, n_train: int = 2000, n_test: int = 400, steps: int = 300, seed: int = PROBE_SEED) -> dict:
    """What the 32 SEED ids carry, read by a small probe trained on them: one-object world images -> ids ->
    (an embedding per (position, id), summed, an MLP) -> colour / shape / size / cell / background; held-out
    accuracy per attribute. Chance: 1/8, 1/6, 1/2, 1/9, 1/3."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    samples = list(shapes.generate(n_train + n_test, seed + 1, size=tokenizer.config.image_size, num_objects=1))
    with torch.no_grad():
        ids = torch.cat([tokenizer.encode([s.image for s in samples[i:i + 200]])
                         for i in range(0, len(samples), 200)]).cpu()
    n_q, k = ids.shape[1], tokenizer.vocab_size
    x = ids + torch.arange(n_q) * k
    labels = {"color": [list(shapes.COLORS).index(s.objects[0].color) for s in samples],
              "shape": [shapes.SHAPES.index(s.objects[0].shape) for s in samples],
              "size": [list(shapes.SIZES).index(s.objects[0].size) for s in samples],
              "cell": [s.objects[0].cell for s in samples],
              "background": [list(shapes.BACKGROUNDS).index(s.background) for s in samples]}
    result = {}
    for attr, ys in labels.items():
        y = torch.tensor(ys)
        emb = torch.nn.Embedding(n_q * k, 32)
        head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, int(y.max()) + 1))
        opt = torch.optim.Adam([*emb.parameters(), *head.parameters()], 3e-3)
        for _ in range(steps):
            idx = torch.randint(0, n_train, (128,))
            loss = F.cross_entropy(head(emb(x[idx]).sum(1)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            result[attr] = (head(emb(x[n_train:]).sum(1)).argmax(1) == y[n_train:]).float().mean().item()
    return result


@torch.no_grad()
def seed_slot_readout(tokenizer, n: int = 300, num_objects: int = 1, seed: int = PROBE_SEED) -> dict:
    """What the tokenizer's own slot head (``CaptionSlots``, trained with it) reads, per attribute, from the
    continuous causal embeddings (``embeddings``) and from the embeddings reconstructed from the 32 ids
    (``codes``): the share of objects (in reading order) whose colour / shape / size / cell it names, and of
    images whose background. It separates what the Q-Former extracts from what quantisation loses."""
    samples = list(shapes.generate(n, seed + 7 + num_objects, size=tokenizer.config.image_size,
                                   num_objects=num_objects))
    images = [s.image for s in samples]
    slots = tokenizer.caption_slots
    target = slots.targets([(s.objects, s.background) for s in samples])
    recon, _ = tokenizer.embed_ids(tokenizer.encode(images))
    return {name: slot_scores(slots, emb, target, num_objects)
            for name, emb in (("embeddings", tokenizer.causal_embeddings(images)), ("codes", recon))}


@torch.no_grad()
def id_agreement(tokenizer, other, n: int = 300, seed: int = PROBE_SEED) -> dict:
    """How many of ``tokenizer``'s ids are ``other``'s on the same fresh scenes (one to three objects): the
    share of positions, of whole 32-id sequences, and of the first 8 positions. For a tokenizer continued
    from another, it says how far the ids an AR model learnt have moved."""
    samples = list(shapes.generate(n, seed + 21, size=tokenizer.config.image_size))
    images = [s.image for s in samples]
    a, b = tokenizer.encode(images), other.encode(images)
    if a.shape != b.shape:
        raise ValueError(f"the tokenizers give ids of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    same = a == b
    return {"positions": same.float().mean().item(), "sequences": same.all(1).float().mean().item(),
            "first_8": same[:, :8].float().mean().item()}


@torch.no_grad()
def slot_scores(slots, emb: torch.Tensor, target: torch.Tensor, num_objects: int = 1) -> dict:
    """A slot head (``CaptionSlots``) on embeddings (b, q, width) against ``slots.targets``: per attribute, the
    share of the first ``num_objects`` objects (reading order) it names, and of images whose background."""
    parts, bg_logits = slots.logits(emb)
    row = {attr: (logits[:, :num_objects].argmax(-1) == target[:, a:12:4][:, :num_objects]).float().mean().item()
           for a, (attr, logits) in enumerate(zip(("color", "shape", "size", "cell"), parts))}
    row["background"] = (bg_logits.argmax(-1) == target[:, 12]).float().mean().item()
    shape_right = (parts[1][:, :num_objects].argmax(-1) == target[:, 1:12:4][:, :num_objects])
    size = target[:, 2:12:4][:, :num_objects]  # the true size of each object
    for k, name in enumerate(slots.sizes):
        if (size == k).any():
            row[f"shape_{name}"] = shape_right[size == k].float().mean().item()
    return row


@torch.no_grad()
def clip_tokens(clip, samples, crops: int = 0) -> torch.Tensor:
    """World samples -> the frozen CLIP's output tokens (class token first, then the patches), 250 at a time;
    with ``crops`` the tokens of the image's ``ShapesCLIP.crop_views`` after the image's own."""
    x = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).float() / 255
    return torch.cat([clip.multicrop_features(x[i:i + 250], crops, class_token=True)[0]
                      for i in range(0, len(x), 250)])


def train_slot_head(config, e_train: torch.Tensor, t_train: torch.Tensor, e_test: torch.Tensor,
                    t_test: torch.Tensor, steps: int, progress: bool = False) -> dict:
    """A fresh slot head (``CaptionSlots``, the tokenizer's optimiser settings) trained on fixed embeddings and
    their targets, scored on one-object test embeddings: shape every 100 steps, every attribute at the end.
    Seeded, so a rerun gives the same figures."""
    from mmgen.tokenizers.seed import CaptionSlots

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = CaptionSlots(config)
    opt = torch.optim.AdamW(head.parameters(), 1e-3, betas=(0.9, 0.98))
    curve = {}
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(e_train), (128,), generator=gen)
        loss, _ = head(e_train[idx], t_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            curve[step] = slot_scores(head, e_test, t_test)["shape"]
            if progress:
                print(f"  fresh slot head: step {step}: shape {curve[step]:.3f}", flush=True)
    return {"shape_by_step": curve, "final": slot_scores(head, e_test, t_test)}


def clip_shape_readout(clip, n_train: int = 3500, n_test: int = 500, steps: int = 400, conv: bool = False,
                       seed: int = PROBE_SEED, progress: bool = False, crops: int = 0) -> dict:
    """Can attention read shape from the frozen CLIP's output tokens (class token first, then the patches)?
    A readout with the Q-Former's means (learnt position embedding at unit scale, 4 queries, two blocks of
    cross-attention and MLP, width 192), trained alone on one-object images to name the shape; ``conv``
    first mixes neighbouring patches with two 3x3 convolutions (residual). Returns held-out shape accuracy
    every 100 steps (chance 1/6) and, at the end, for small and large objects apart. Training is seeded, so a
    rerun gives the same figures. ``crops``: the readout reads the tokens of the image and of its ``crops`` x
    ``crops`` upsampled crops (``ShapesCLIP.crop_views``) side by side (not with ``conv``)."""
    import torch.nn.functional as F
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    samples = list(shapes.generate(n_train + n_test, seed + 3, size=clip.image_size, num_objects=1))
    y = torch.tensor([shapes.SHAPES.index(s.objects[0].shape) for s in samples])
    if conv and crops:
        raise ValueError("the conv readout reads one view's grid; crops need conv=False")
    f = clip_tokens(clip, samples, crops)
    width, dim, grid = 192, f.shape[-1], int(round((f.shape[1] - 1) ** 0.5))

    class Readout(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(dim, dim, 3, padding=1)) if conv else None
            self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
            self.pos = nn.Parameter(torch.randn(f.shape[1], width))
            self.q = nn.Parameter(torch.randn(4, width) * 0.02)
            self.attn = nn.ModuleList(nn.MultiheadAttention(width, 4, batch_first=True) for _ in range(2))
            self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                                   nn.Linear(4 * width, width)) for _ in range(2))
            self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(shapes.SHAPES)))

        def forward(self, feats):
            if self.conv is not None:
                patches = feats[:, 1:]
                mixed = self.conv(patches.transpose(1, 2).reshape(len(feats), dim, grid, grid))
                feats = torch.cat([feats[:, :1], patches + mixed.flatten(2).transpose(1, 2)], 1)
            kv = self.proj(feats) + self.pos
            q = self.q.expand(len(feats), -1, -1)
            for attn, mlp in zip(self.attn, self.mlp):
                q = q + attn(q, kv, kv, need_weights=False)[0]
                q = q + mlp(q)
            return self.head(q[:, 0])

    model = Readout()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    curve = {}
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (128,), generator=gen)
        loss = F.cross_entropy(model(f[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                right = model(f[n_train:]).argmax(1) == y[n_train:]
            curve[step] = right.float().mean().item()
            if progress:
                print(f"  shape readout{' (conv)' if conv else ''}: step {step}: {curve[step]:.3f}", flush=True)
    sizes = [s.objects[0].size for s in samples[n_train:]]  # ``right``: the last step's held-out readout
    by_size = {size: right[[i for i, z in enumerate(sizes) if z == size]].float().mean().item()
               for size in shapes.SIZES if size in sizes}
    return {"shape_by_step": curve, "shape": curve[steps], "shape_by_size": by_size}


def seed_fresh_slot_readout(tokenizer, n_train: int = 3000, n_test: int = 500, steps: int = 600,
                            train_objects: int | None = 1, seed: int = PROBE_SEED, progress: bool = False) -> dict:
    """Is an attribute in the causal embeddings, or has the tokenizer's own slot head just not learnt to read it?
    A fresh slot head (``CaptionSlots``, same architecture and optimiser settings as in training) is trained on
    the tokenizer's frozen continuous causal embeddings of a fixed image set (``train_objects`` objects each;
    ``None``: the training mix of one to three), then scored on held-out one-object images. Returns shape
    accuracy every 100 steps and every attribute at the end. Seeded, so a rerun gives the same figures."""
    import itertools

    size = tokenizer.config.image_size
    train = list(itertools.islice(shapes.generate(None, seed + 11, size=size, num_objects=train_objects,
                                                  exclude_combos=shapes.HELD_OUT_COMBOS), n_train))
    test = list(shapes.generate(n_test, seed + 12, size=size, num_objects=1))

    @torch.no_grad()
    def embed(samples):
        return torch.cat([tokenizer.causal_embeddings([s.image for s in samples[i:i + 250]])
                          for i in range(0, len(samples), 250)]).cpu()

    def targets(samples):
        return tokenizer.caption_slots.targets([(s.objects, s.background) for s in samples])

    return train_slot_head(tokenizer.config, embed(train), targets(train), embed(test), targets(test), steps,
                           progress)
