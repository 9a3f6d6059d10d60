"""Captioning accuracy on shapes-world images: a caption is right when it names every object with all its
attributes (colour, shape, size, cell) and the background, nothing more (parsed back with
``shapes_eval.parse_prompt``; order of mention does not matter). Reported overall, by object count, and per
attribute (the share of objects whose colour / shape / size / position the caption got right, matching
objects by cell first and then by colour+shape), and the share of small and of large objects whose shape it
named right."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from tqdm.auto import tqdm

from mmgen.eval.shapes_eval import parse_prompt
from mmgen.worlds import shapes

CAPTION_EVAL_SEED = 910_001  # away from every training stream


def caption_scenes(n: int, seed: int = CAPTION_EVAL_SEED, size: int = 64) -> list[shapes.ShapesSample]:
    """n fresh world scenes per object count (1, 2, 3), all colour-shape pairs (held-out ones included)."""
    return [s for k in (1, 2, 3) for s in shapes.generate(n, seed + k, size=size, num_objects=k)]


def judge_caption(caption: str, objects: Sequence[shapes.ShapeObject], background: str) -> dict:
    """-> {"correct": bool, "parsed": bool, "background": bool, per attribute: objects right (count), and
    "shape_small" / "shape_large": small / large objects (by the true size) whose shape is right (count)}."""
    out = {"correct": False, "parsed": False, "background": False, "color": 0, "shape": 0, "size": 0, "cell": 0,
           "shape_small": 0, "shape_large": 0}
    try:
        got, bg = parse_prompt(caption)
    except ValueError:
        return out
    out["parsed"], out["background"] = True, bg == background
    want = Counter((o.color, o.shape, o.size, o.cell) for o in objects)
    have = Counter((o.color, o.shape, o.size, o.cell) for o in got)
    out["correct"] = out["background"] and want == have
    by_cell = {o.cell: o for o in got}
    used = set()
    for o in objects:
        m = by_cell.get(o.cell)
        if m is None:
            m = next((g for g in got if id(g) not in used and (g.color, g.shape) == (o.color, o.shape)), None)
        if m is None:
            continue
        used.add(id(m))
        for attr in ("color", "shape", "size", "cell"):
            out[attr] += getattr(m, attr) == getattr(o, attr)
        out[f"shape_{o.size}"] += m.shape == o.shape
    return out


@torch.no_grad()
def evaluate_captions(pipe, n: int = 50, seed: int = CAPTION_EVAL_SEED, batch: int = 50,
                      progress: bool = False, beams: int | None = None, rerank: float | None = None,
                      mirror: bool | None = None) -> dict:
    """Caption n scenes per object count with ``pipe`` (an ImageToTextPipeline; ``beams``, ``rerank``, ``mirror`` as
    its call takes them, None: the checkpoint's defaults); accuracy overall, by count, per attribute, and a
    few examples."""
    samples = caption_scenes(n, seed)
    rows, examples = [], []
    for start in tqdm(range(0, len(samples), batch), disable=not progress, desc="caption"):
        chunk = samples[start:start + batch]
        captions = pipe([s.image for s in chunk], beams=beams, rerank=rerank, mirror=mirror).captions
        for s, c in zip(chunk, captions):
            j = judge_caption(c, s.objects, s.background)
            rows.append((len(s.objects), j))
            if len(examples) < 6 and len(s.objects) == 1 + len(examples) % 3:
                examples.append({"truth": s.canonical_caption, "caption": c, "correct": j["correct"]})
    n_obj = sum(k for k, _ in rows)
    result = {"n": len(rows), "accuracy": sum(j["correct"] for _, j in rows) / len(rows),
              "parsed": sum(j["parsed"] for _, j in rows) / len(rows),
              "background": sum(j["background"] for _, j in rows) / len(rows)}
    for k in (1, 2, 3):
        sub = [j for m, j in rows if m == k]
        result[f"accuracy_{k}obj"] = sum(j["correct"] for j in sub) / max(1, len(sub))
    for attr in ("color", "shape", "size", "cell"):
        result[f"{attr}_per_object"] = sum(j[attr] for _, j in rows) / max(1, n_obj)
    for size in ("small", "large"):
        n_size = sum(o.size == size for s in samples for o in s.objects)
        result[f"shape_per_{size}_object"] = sum(j[f"shape_{size}"] for _, j in rows) / max(1, n_size)
    result["examples"] = examples
    return result
