"""text-eval runs: reconstruction through a tokenizer, and text-to-image through a pipeline, on the text world.

Scenes come from a seed no training stream uses; ``n`` short scenes (1-2 lines) and ``n`` long ones (3 or more
lines) at the tokenizer's canvas. Both runs report CER (overall, short, long), colour and alignment checks;
reconstruction also reports PSNR and bits per pixel (what the tokens can carry: tokens x log2(vocabulary) /
pixels).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from mmgen.eval import text_eval
from mmgen.worlds import text as tw

TEXT_EVAL_SEED = 900_201


def eval_scenes(n: int, canvas: int, seed: int = TEXT_EVAL_SEED) -> list[tw.TextSample]:
    """n short (1-2 lines) and n long (3+ lines, where the canvas fits them) scenes."""
    short = list(tw.generate(n, seed=seed, canvas=canvas, min_lines=1, max_lines=2))
    fits = tw.geometry(canvas, "small")[2]
    long = list(tw.generate(n, seed=seed + 1, canvas=canvas, min_lines=min(3, fits))) if fits >= 3 else []
    return short + long


def _judge_all(images, samples, progress: bool, desc: str) -> dict:
    results = [text_eval.judge(im, s.text, s.color, s.background, s.align)
               for im, s in tqdm(list(zip(images, samples)), disable=not progress, desc=desc)]
    return text_eval.summarize(results, [len(s.lines) for s in samples])


@torch.no_grad()
def evaluate_reconstruction(tokenizer, n: int = 20, batch: int = 8, progress: bool = False) -> dict:
    from mmgen.tokenizers.vq_image import tensor_to_images

    size = tokenizer.config.image_size
    samples = eval_scenes(n, size)
    images = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        images += tensor_to_images(tokenizer.decode(tokenizer.encode([s.image for s in chunk])))
    res = _judge_all(images, samples, progress, "ocr reconstructions")
    mse = np.mean([np.mean((np.asarray(a, float) - np.asarray(s.image, float)) ** 2) for a, s in zip(images, samples)])
    res["psnr"] = float(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))
    res["bits_per_pixel"] = tokenizer.layout.num_tokens * math.log2(tokenizer.vocab_size) / size ** 2
    res["tokens"] = tokenizer.layout.num_tokens
    return res


@torch.no_grad()
def evaluate_text_to_image(pipe, n: int = 20, seed: int = 0, batch: int = 8, progress: bool = False,
                           scenes_seed: int = TEXT_EVAL_SEED, **sampling) -> dict:
    """``seed`` seeds the sampler; ``scenes_seed`` draws the scenes (another one than the report's, e.g. to
    choose sampling settings without looking at the scenes the figures are reported on)."""
    samples = eval_scenes(n, pipe.tokenizer.config.image_size, seed=scenes_seed)
    gen = torch.Generator().manual_seed(seed)
    images, seconds = [], 0.0
    for i in tqdm(range(0, len(samples), batch), disable=not progress, desc="generate text"):
        out = pipe([s.caption for s in samples[i:i + batch]], generator=gen, **sampling)
        images += out.images
        seconds += out.record["seconds"]
    res = _judge_all(images, samples, progress, "ocr generations")
    res["seconds_per_image"] = seconds / len(samples)
    return res
