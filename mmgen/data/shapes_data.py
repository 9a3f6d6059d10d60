"""Batches from the shapes world (streamed, seeded per process) or from a user's folder of images + captions.

A user folder holds images and a ``metadata.jsonl`` in Hugging Face ``imagefolder`` style
(``{"file_name": "a.png", "text": "..."}`` per line); it is read through ``datasets``.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mmgen.worlds import shapes


def _image_batches(stream, batch_size: int, uint8: bool = False, glyph_cell: int = 0) -> Iterator[tuple]:
    """Samples with ``.image`` (PIL) and ``.caption`` -> endless (images (b, 3, H, W) in [0, 1], captions);
    ``uint8``: the images as rendered, 0-255 (what worker processes pass on). ``glyph_cell`` (text samples):
    a third item, each page's ``text.glyph_map`` at that cell, (b, H / cell, W / cell) uint8."""
    if glyph_cell:
        from mmgen.worlds import text
    while True:
        chunk = list(itertools.islice(stream, batch_size))
        x = torch.from_numpy(np.stack([np.asarray(s.image) for s in chunk])).permute(0, 3, 1, 2)
        out = ((x.contiguous() if uint8 else x.float() / 255.0), [s.caption for s in chunk])
        if glyph_cell:
            out += (torch.from_numpy(np.stack([text.glyph_map(s, glyph_cell) for s in chunk])),)
        yield out


def world_batches(batch_size: int, seed: int, size: int = 64, paraphrase: bool = True,
                  exclude_combos=shapes.HELD_OUT_COMBOS, rank: int = 0,
                  uint8: bool = False) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless (images (b, 3, H, W) in [0, 1], or 0-255 with ``uint8``, captions) from the shapes world; each
    rank gets its own stream."""
    return _image_batches(shapes.generate(None, seed=seed * 1000 + rank, size=size, paraphrase=paraphrase,
                                          exclude_combos=exclude_combos), batch_size, uint8)


def text_world_batches(batch_size: int, seed: int, size: int = 256, paraphrase: bool = True,
                       rank: int = 0, uint8: bool = False, glyph_cell: int = 0) -> Iterator[tuple]:
    """Endless (images, captions) from the text world (long-text images) at a canvas of ``size``; images as in
    ``world_batches``; ``glyph_cell``: each page's glyph map too (``_image_batches``)."""
    from mmgen.worlds import text

    return _image_batches(text.generate(None, seed=seed * 1000 + rank, canvas=size, paraphrase=paraphrase),
                          batch_size, uint8, glyph_cell)


def _in_process(world: str, batch_size: int, seed: int, size: int, rank: int, paraphrase: bool, exclude_combos,
                uint8: bool = False, glyph_cell: int = 0):
    if world == "shapes":
        if glyph_cell:
            raise ValueError("glyph maps are the text world's: the shapes world writes no letters")
        return world_batches(batch_size, seed, size, paraphrase, exclude_combos, rank, uint8)
    return text_world_batches(batch_size, seed, size, paraphrase, rank, uint8, glyph_cell)


WORKER_RANK_STRIDE = 100  # worker w of rank r renders rank r + 100 (w + 1)'s stream (fewer than 100 ranks)


class _WorldStream(torch.utils.data.IterableDataset):
    """A world's batches inside DataLoader workers, each worker on its own stream (``WORKER_RANK_STRIDE``);
    images travel between processes as uint8 (a quarter of float32's shared memory)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        kw = dict(self.kwargs)
        kw["rank"] += WORKER_RANK_STRIDE * ((info.id if info is not None else 0) + 1)
        return _in_process(**kw, uint8=True)


def training_batches(world: str, batch_size: int, seed: int, size: int, rank: int = 0, paraphrase: bool = True,
                     exclude_combos=shapes.HELD_OUT_COMBOS,
                     workers: int = 0, device=None, glyph_cell: int = 0) -> Iterator[tuple]:
    """The batches of a recipe's world: ``shapes`` or ``text`` (``exclude_combos`` applies to shapes).

    ``workers`` > 0 renders them in that many DataLoader processes (for an accelerator that one CPU process
    cannot feed); each worker has its own stream, so the batches differ from the in-process ones (0).
    ``device``: the images arrive there as uint8 (0-255, what a tokenizer's ``encode`` takes), copied without
    waiting on the device's queue (from pinned memory on CUDA): a blocking copy would make the training loop
    wait for the previous step's kernels before it could prepare the next. ``glyph_cell`` (the text world):
    each batch has a third item, the pages' glyph maps (``_image_batches``), on ``device`` too."""
    if world not in ("shapes", "text"):
        raise ValueError(f"unknown training world {world!r}: shapes or text")
    if workers < 0:
        raise ValueError(f"data workers must be 0 or more, got {workers}")
    if workers:
        stream = _WorldStream(world=world, batch_size=batch_size, seed=seed, size=size, rank=rank,
                              paraphrase=paraphrase, exclude_combos=exclude_combos, glyph_cell=glyph_cell)
        pin = device is not None and torch.device(device).type == "cuda"
        batches = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin)
        if device is None:
            return ((x.float() / 255.0, *rest) for x, *rest in batches)
    elif device is None:
        return _in_process(world, batch_size, seed, size, rank, paraphrase, exclude_combos, glyph_cell=glyph_cell)
    else:
        batches = _in_process(world, batch_size, seed, size, rank, paraphrase, exclude_combos, uint8=True,
                              glyph_cell=glyph_cell)
    # uint8 pages, 0-255 (and glyph maps) on the device
    return ((x.to(device, non_blocking=True), c, *(g.to(device, non_blocking=True) for g in rest))
            for x, c, *rest in batches)


def folder_batches(folder: str, batch_size: int, seed: int, size: int = 64, rank: int = 0,
                   world_size: int = 1) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless shuffled batches from a user's image folder with captions in metadata.jsonl (``text`` column)."""
    from datasets import load_dataset

    path = Path(folder)
    if not (path / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"{folder} needs a metadata.jsonl with file_name and text columns")
    ds = load_dataset("imagefolder", data_dir=str(path), split="train").shard(world_size, rank)
    if "text" not in ds.column_names:
        raise ValueError(f"{folder}/metadata.jsonl needs a text column (the caption), found {ds.column_names}")
    if len(ds) < batch_size:
        raise ValueError(f"{folder} gives {len(ds)} image(s) per process, fewer than one batch of {batch_size}: "
                         "add images or lower the batch size")
    epoch = 0
    while True:
        shuffled = ds.shuffle(seed=seed + epoch)  # once per epoch
        for start in range(0, len(ds) - batch_size + 1, batch_size):
            rows = shuffled[start:start + batch_size]
            arr = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in rows["image"]])
            yield torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0, list(rows["text"])
        epoch += 1


NEGATIVE_KINDS = ("cell", "shape", "size", "color")
DEFAULT_NEGATIVE_WEIGHTS = {"cell": 2, "shape": 1, "size": 1, "color": 1}  # position is the hardest to learn


def negative_kind_table(weights: dict | None) -> tuple[str, ...]:
    """``{kind: integer weight}`` -> the tuple a hard negative's kind is drawn from uniformly; clear errors for
    unknown kinds or weights that are not non-negative integers summing above zero."""
    weights = DEFAULT_NEGATIVE_WEIGHTS if weights is None else weights
    if not isinstance(weights, dict):
        raise ValueError(f"hard_negative_kinds must map kinds to weights, got {weights!r}")
    unknown = sorted(set(weights) - set(NEGATIVE_KINDS))
    if unknown:
        raise ValueError(f"unknown hard-negative kind(s) {unknown}; known: {list(NEGATIVE_KINDS)}")
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in weights.values()) \
            or sum(weights.values()) == 0:
        raise ValueError(f"hard-negative weights must be non-negative integers, not all zero: {weights!r}")
    return tuple(k for k in NEGATIVE_KINDS for _ in range(weights.get(k, 0)))


def perturb_scene(objects, background: str, rng, kinds: tuple[str, ...] | None = None) -> list:
    """The scene with exactly one attribute of one object changed (cell, shape, size or colour), still a valid
    scene (one object per cell): what a hard-negative caption describes. The attribute is drawn uniformly from
    ``kinds`` (repeat a kind to weight it; ``negative_kind_table`` builds it from a recipe's weights; None:
    the default weights)."""
    objs = [shapes.ShapeObject(o.color, o.shape, o.size, o.cell) for o in objects]
    i = rng.randrange(len(objs))
    o = objs[i]
    kind = rng.choice(kinds or negative_kind_table(None))
    if kind == "cell":
        free = [c for c in range(9) if c not in {p.cell for p in objs}]
        o.cell = rng.choice(free)
    elif kind == "shape":
        o.shape = rng.choice([s for s in shapes.SHAPES if s != o.shape])
    elif kind == "size":
        o.size = "small" if o.size == "large" else "large"
    else:
        o.color = rng.choice([c for c in shapes.COLORS if c != o.color])
    return objs


def contrastive_batches(batch_size: int, seed: int, size: int = 64, rank: int = 0,
                        exclude_combos=shapes.HELD_OUT_COMBOS, paraphrase: bool = True,
                        negative_kinds: dict | None = None
                        ) -> Iterator[tuple[torch.Tensor, list[str], list[str], list[str], list]]:
    """Endless (images, captions, hard-negative captions, reading-order canonical captions, (objects,
    background) scenes) from the shapes world. Captions are paraphrased as in
    training (or canonical with ``paraphrase=False``); each negative describes the same scene with one
    attribute of one object changed (NegCLIP-style hard negatives: in-batch negatives alone rarely differ only
    in position, so a CLIP never has to learn it); ``negative_kinds`` weights which attribute changes."""
    import random

    kinds = negative_kind_table(negative_kinds)
    rng = random.Random(seed * 1000 + rank + 5)
    stream = shapes.generate(None, seed=seed * 1000 + rank, size=size, paraphrase=paraphrase,
                             exclude_combos=exclude_combos)
    while True:
        chunk = list(itertools.islice(stream, batch_size))
        arr = np.stack([np.asarray(s.image) for s in chunk])
        negatives = [shapes.paraphrase_caption(perturb_scene(s.objects, s.background, rng, kinds), s.background, rng)
                     if paraphrase and rng.random() < 0.7 else
                     shapes.canonical_caption(perturb_scene(s.objects, s.background, rng, kinds), s.background)
                     for s in chunk]
        described = [shapes.canonical_caption(sorted(s.objects, key=lambda o: o.cell), s.background) for s in chunk]
        yield (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0, [s.caption for s in chunk], negatives,
               described, [(s.objects, s.background) for s in chunk])
