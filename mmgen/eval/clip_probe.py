"""What a CLIP can tell apart: for fresh one-object world images, does the true caption outscore every caption
that changes exactly one attribute (colour, shape, size, position, background)? Per attribute, the share of
images for which it does. This is how the project checks its CLIP judge and SEED's vision tower."""
from __future__ import annotations

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
