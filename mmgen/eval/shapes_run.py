"""shapes-eval runs: reconstruction through a tokenizer, and text-to-image through a pipeline.

Prompt sets (all seeded, none drawn from the training stream's seeds):
- ``canonical``: canonical captions of fresh world scenes;
- ``paraphrase_held_out``: the world's evaluation-only wording (never seen in training) on scenes whose first
  object is a colour-shape pair held out of training (``shapes.HELD_OUT_COMBOS``).
Two diagnostic sets take that one apart:
- ``held_out_wording``: the evaluation-only wording on scenes made only of colour-shape pairs seen in training;
- ``held_out_combos``: canonical captions of scenes whose first object is a held-out colour-shape pair.
Scenes are judged against their attributes; prompts are also parsed back (parse_prompt) as a check.
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
from tqdm.auto import tqdm

from mmgen.eval import shapes_eval
from mmgen.worlds import shapes

EVAL_SEED = 900_001  # training streams use small seeds; evaluation scenes come from elsewhere
PROMPT_SETS = ("canonical", "paraphrase_held_out", "held_out_wording", "held_out_combos")


def eval_scenes(prompt_set: str, n: int, seed: int = EVAL_SEED, size: int = 64) -> list[shapes.ShapesSample]:
    """n samples per object count (1, 2, 3) of a prompt set."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; expected one of {PROMPT_SETS}")
    out = []
    for k in (1, 2, 3):
        if prompt_set == "canonical":
            gen = shapes.generate(n, seed + k, size=size, num_objects=k)
        elif prompt_set == "paraphrase_held_out":
            gen = shapes.generate(n, seed + 10 + k, size=size, num_objects=k, held_out=True,
                                  only_combos=shapes.HELD_OUT_COMBOS)
        elif prompt_set == "held_out_wording":
            gen = shapes.generate(n, seed + 20 + k, size=size, num_objects=k, held_out=True,
                                  exclude_combos=shapes.HELD_OUT_COMBOS)
        else:
            gen = shapes.generate(n, seed + 30 + k, size=size, num_objects=k, only_combos=shapes.HELD_OUT_COMBOS)
        out.extend(gen)
    return out


def _batched(items: list, size: int) -> Iterable[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _summary(images, samples) -> dict:
    return shapes_eval.score(images, [(s.objects, s.background) for s in samples])


@torch.no_grad()
def evaluate_reconstruction(tokenizer, n: int = 100, seed: int = EVAL_SEED, batch: int = 50,
                            progress: bool = False, **decode_options) -> dict:
    """Encode -> decode world images and judge them against their own attributes (n per object count).
    ``decode_options`` go to a diffusion decoder's ``decode`` (SEED: ``steps``, ``guidance_scale``)."""
    from mmgen.tokenizers.vq_image import tensor_to_images

    samples = eval_scenes("canonical", n, seed, tokenizer.config.image_size)
    images = []
    gen = torch.Generator().manual_seed(seed)  # a diffusion decoder (SEED) draws seeded noise
    for chunk in tqdm(list(_batched(samples, batch)), disable=not progress, desc="reconstruct"):
        ids = tokenizer.encode([s.image for s in chunk])
        diffusion = getattr(tokenizer, "decode_needs_generator", False)
        if decode_options and not diffusion:
            raise ValueError(f"decode options {sorted(decode_options)} need a diffusion decoder (SEED)")
        pixels = tokenizer.decode(ids, generator=gen, **decode_options) if diffusion else tokenizer.decode(ids)
        images.extend(tensor_to_images(pixels))
    res = _summary(images, samples)
    import numpy as np
    mse = np.mean([np.mean((np.asarray(a, float) - np.asarray(s.image, float)) ** 2) for a, s in zip(images, samples)])
    res["psnr"] = float(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))
    return res


@torch.no_grad()
def evaluate_text_to_image(pipe, prompt_set: str = "canonical", n: int = 50, seed: int = 0, batch: int = 16,
                           progress: bool = False, **sampling) -> dict:
    """Generate one image per prompt (n prompts per object count) and judge it against the prompt's scene."""
    samples = eval_scenes(prompt_set, n)
    gen = torch.Generator().manual_seed(seed)
    images, seconds = [], 0.0
    for chunk in tqdm(list(_batched(samples, batch)), disable=not progress, desc=f"generate {prompt_set}"):
        out = pipe([s.caption for s in chunk], generator=gen, **sampling)
        images.extend(out.images)
        seconds += out.record["seconds"]
    res = _summary(images, samples)
    res["prompt_set"] = prompt_set
    res["seconds_per_image"] = seconds / len(samples)
    return res
