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


@torch.no_grad()
def seed_attribute_retrieval(tokenizer, n: int = 100, seed: int = PROBE_SEED) -> dict:
    """The same probe for a SEED tokenizer, read from its 32 codes: the embedding reconstructed from the
    quantised tokens is scored against each caption variant through the stage-1 alignment heads."""
    import torch.nn.functional as F

    samples = list(shapes.generate(n, seed, size=tokenizer.config.image_size, num_objects=1))
    recon, _ = tokenizer.embed_ids(tokenizer.encode([s.image for s in samples]))
    img = F.normalize(tokenizer.align_proj(recon[:, -1]), dim=-1)
    result = {}
    for attr in ATTRIBUTES:
        right = 0
        for i, s in enumerate(samples):
            options, truth = _variants(s, attr)
            txt = tokenizer.caption_encoder([shapes.canonical_caption([obj], bg) for obj, bg in options])
            right += int((txt @ img[i]).argmax()) == truth
        result[attr] = right / n
    return result


@torch.no_grad()
def attribute_retrieval(clip, n: int = 100, seed: int = PROBE_SEED) -> dict:
    samples = list(shapes.generate(n, seed, size=clip.image_size, num_objects=1))
    img = clip.encode_image([s.image for s in samples])
    result = {}
    for attr in ATTRIBUTES:
        right = 0
        for i, s in enumerate(samples):
            options, truth = _variants(s, attr)
            txt = clip.encode_text([shapes.canonical_caption([obj], bg) for obj, bg in options])
            right += int((txt @ img[i]).argmax()) == truth
        result[attr] = right / n
    return result
