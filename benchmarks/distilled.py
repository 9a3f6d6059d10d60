"""Distilled Decoding against its AR teacher, side by side in one run.

For the same prompts (shapes-eval's canonical set) and the same seeds, three samplers of one checkpoint:
the AR teacher (its default sampling options), the DD student in one step and in two steps. Reported:
seconds per image at batch 1 and batch 16, forward passes per batch, shapes-eval (overall and by object
count), and FD-VQ, a Frechet distance between Gaussian fits of image features of the generated images and of
the world's own renders of the same scenes. The features come from the checkpoint's own VQ tokenizer
encoder (the continuous latents before quantisation, average-pooled to 4x4, 128 numbers per 64x64 image),
which the project trains and ships; FD-VQ is comparable only between runs on the same checkpoint.

    .venv/bin/python benchmarks/distilled.py --quick                        # 16 prompts per object count
    .venv/bin/python benchmarks/distilled.py --checkpoint checkpoints/shapes --n 50

Ends with one JSON line: speedup_dd1_vs_ar_b16, speedup_dd2_vs_ar_b16, score_ar, score_dd1, score_dd2,
score_ratio_dd1, score_ratio_dd2, fd_vq_ar, fd_vq_dd1, fd_vq_dd2 and the timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.eval import shapes_eval  # noqa: E402
from mmgen.eval.shapes_run import eval_scenes  # noqa: E402
from mmgen.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from mmgen.tokenizers.vq_image import images_to_tensor  # noqa: E402

SAMPLERS = (("ar", 1), ("dd", 1), ("dd", 2))


@torch.no_grad()
def vq_features(tokenizer, images) -> np.ndarray:
    x = images_to_tensor(images, tokenizer.config.image_size)
    z = tokenizer.encoder(x * 2 - 1)                                    # (n, code_dim, h, w)
    return F.adaptive_avg_pool2d(z, 4).flatten(1).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(ca @ cb, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def generate(pipe, prompts, seeds, sampler, steps, batch):
    images, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        t0 = time.perf_counter()
        out = pipe(prompts[i:i + batch], generator=gens, sampler=sampler, steps=steps, candidates=1)  # the samplers
        seconds += time.perf_counter() - t0
        images += out.images
        passes = out.record["forward_passes"]
    return images, seconds / len(prompts), passes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "shapes"))
    ap.add_argument("--quick", action="store_true", help="16 prompts per object count, 12 timed at batch 1")
    ap.add_argument("--n", type=int, default=None, help="prompts per object count (default 16 quick / 50)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint)
    if pipe.student is None:
        ap.error(f"{args.checkpoint} has no Distilled Decoding student (mmgen train dd --teacher ...)")
    n = args.n or (16 if args.quick else 50)
    n_b1 = 12 if args.quick else 24
    scenes = eval_scenes("canonical", n)
    prompts = [s.caption for s in scenes]
    seeds = list(range(len(prompts)))
    world = vq_features(pipe.tokenizer, [s.image for s in scenes])
    pipe("warm up a small red circle in the center on a black background", candidates=1)  # load and warm up
    figures, table = {}, []
    for sampler, steps in SAMPLERS:
        name = "ar" if sampler == "ar" else f"dd{steps}"
        images, s16, passes = generate(pipe, prompts, seeds, sampler, steps, 16)
        _, s1, _ = generate(pipe, prompts[:n_b1], seeds[:n_b1], sampler, steps, 1)
        res = shapes_eval.score(images, [(s.objects, s.background) for s in scenes])
        fd = frechet(vq_features(pipe.tokenizer, images), world)
        figures.update({f"seconds_per_image_{name}_b16": round(s16, 4), f"seconds_per_image_{name}_b1": round(s1, 4),
                        f"forward_passes_{name}": passes, f"score_{name}": round(res["score"], 4),
                        f"score_{name}_by_objects": res["by_objects"], f"fd_vq_{name}": round(fd, 4)})
        table.append((name, s1, s16, passes, res["score"], fd))
    for name in ("dd1", "dd2"):
        figures[f"speedup_{name}_vs_ar_b16"] = round(figures["seconds_per_image_ar_b16"] /
                                                     figures[f"seconds_per_image_{name}_b16"], 1)
        figures[f"speedup_{name}_vs_ar_b1"] = round(figures["seconds_per_image_ar_b1"] /
                                                    figures[f"seconds_per_image_{name}_b1"], 1)
        figures[f"score_ratio_{name}"] = round(figures[f"score_{name}"] / max(figures["score_ar"], 1e-9), 3)
    figures.update({"checkpoint": args.checkpoint, "prompts": len(prompts), "images_timed_b1": n_b1,
                    "threads": torch.get_num_threads(),
                    "feature_extractor": "checkpoint VQ encoder latents, 4x4 average pool (128-d)"})
    print(f"{'sampler':8} {'s/img b1':>9} {'s/img b16':>10} {'passes':>7} {'shapes-eval':>12} {'FD-VQ':>8}")
    for name, s1, s16, passes, score, fd in table:
        print(f"{name:8} {s1:9.4f} {s16:10.4f} {passes:7d} {score:12.3f} {fd:8.3f}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
