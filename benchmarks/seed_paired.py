"""Two SEED builds judged scene by scene on the same tuning scenes, with the exact sign test on the scenes only
one of them gets right (``mmgen/eval/paired.py``). Drawing serves any two text-to-image builds (e.g. two shapes
models), on any of shapes-eval's prompt sets (``--draw-sets``). Tuning scenes only, never the reported ones: captions on
``benchmarks/tune_sampling.CAPTION_TUNING_SEED``, drawing and reconstructions on its ``TUNING_SEED``, with the
same scenes, batches and sampler seeds as ``tune_sampling.py``, so its totals match that script's.

    .venv/bin/python benchmarks/seed_paired.py --a checkpoints/seed --b runs/pack_s6 --captions 500
    .venv/bin/python benchmarks/seed_paired.py --a checkpoints/seed --b runs/pack_s6 --draw 150 --recon 100
    # one build, two ways of captioning: greedy against its caption_defaults (beam search + reranking)
    .venv/bin/python benchmarks/seed_paired.py --a checkpoints/seed --b checkpoints/seed --captions 500 \
        --a-caption-options '{"beams": 1}'

    # two shapes models at their own defaults, one draw an image, on canonical and held-out-pair prompts
    .venv/bin/python benchmarks/seed_paired.py --a checkpoints/shapes --b runs/pack_more --draw 100 \
        --draw-options '{"guidance_scale": null, "temperature": null, "top_p": null, "cfg_schedule": null,
                         "candidates": 1}' \
        --draw-sets canonical held_out_combos

One JSON line per task ("captions", "draw", "recon"; drawing on a set other than canonical is "draw:SET"):
each build's scenes right, the discordant counts a_only and b_only, p_sign, and the same by object count;
"options": both sides' sampling (drawing) or caption options when they differ (options not given in
--draw-options or --X-caption-options come from each build's own).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tune_sampling import CAPTION_TUNING_SEED, TUNING_SEED  # noqa: E402

from mmgen.eval import shapes_eval, shapes_run  # noqa: E402
from mmgen.eval.caption import caption_scenes, judge_caption  # noqa: E402
from mmgen.eval.paired import compare  # noqa: E402


def caption_verdicts(checkpoint: str, n: int, options: dict | None = None) -> tuple[list[bool], list[int], dict]:
    """-> verdicts, object counts, and the caption options used (``options`` over the build's
    caption_defaults: beams, rerank)."""
    from mmgen.pipelines.image_to_text import ImageToTextPipeline

    pipe = ImageToTextPipeline.from_pretrained(checkpoint)
    options = pipe.caption_options(**(options or {}))  # the given ones over the build's caption_defaults
    scenes = caption_scenes(n, CAPTION_TUNING_SEED)
    right = []
    for i in range(0, len(scenes), 50):  # evaluate_captions' batches, so greedy ties break alike
        chunk = scenes[i:i + 50]
        for s, c in zip(chunk, pipe([s.image for s in chunk], **options).captions):
            right.append(judge_caption(c, s.objects, s.background)["correct"])
    return right, [len(s.objects) for s in scenes], options


def draw_verdicts(checkpoint: str, n: int, options: dict, prompt_set: str = "canonical"
                  ) -> tuple[list[bool], list[int], dict]:
    """-> verdicts, object counts, and the build's sampling defaults (they fill what ``options`` leaves out;
    ``options`` null for a build's own defaults)."""
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(checkpoint)
    scenes = shapes_run.eval_scenes(prompt_set, n, seed=TUNING_SEED)
    options = {"temperature": 1.0, "top_p": 1.0, "cfg_schedule": "constant", **options}
    options = {k: v for k, v in options.items() if v is not None}
    right = []
    for i in range(0, len(scenes), 32):  # tune_sampling's batches and sampler seeds
        chunk = scenes[i:i + 32]
        images = pipe([s.caption for s in chunk], generator=torch.Generator().manual_seed(i), **options).images
        right += [shapes_eval.judge(im, s.objects, s.background)["satisfied"] for im, s in zip(images, chunk)]
    return right, [len(s.objects) for s in scenes], dict(pipe.defaults)


@torch.no_grad()
def recon_verdicts(checkpoint: str, n: int, options: dict) -> tuple[list[bool], list[int]]:
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    tok = TextToImagePipeline.from_pretrained(checkpoint).tokenizer
    if not getattr(tok, "decode_needs_generator", False):
        raise SystemExit(f"error: {checkpoint} has no diffusion decoder to reconstruct through")
    scenes = shapes_run.eval_scenes("canonical", n, seed=TUNING_SEED, size=tok.config.image_size)
    gen = torch.Generator().manual_seed(TUNING_SEED)  # evaluate_reconstruction's noise, batch 16
    right = []
    for i in range(0, len(scenes), 16):
        chunk = scenes[i:i + 16]
        images = tok.decode_images(tok.encode([s.image for s in chunk]), generator=gen, **options)
        right += [shapes_eval.judge(im, s.objects, s.background)["satisfied"] for im, s in zip(images, chunk)]
    return right, [len(s.objects) for s in scenes]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="one SEED checkpoint folder (e.g. the shipped checkpoints/seed)")
    ap.add_argument("--b", required=True, help="the other SEED checkpoint folder")
    ap.add_argument("--captions", type=int, default=0, metavar="N", help="caption N tuning scenes per object count")
    ap.add_argument("--draw", type=int, default=0, metavar="N", help="draw N tuning prompts per object count")
    ap.add_argument("--recon", type=int, default=0, metavar="N",
                    help="reconstruct N tuning scenes per object count (tokenizer and decoder only)")
    ap.add_argument("--draw-options", default='{"guidance_scale": 3.0}',
                    help="JSON sampling options for --draw (default guidance 3.0, as tune_sampling was run; "
                         "temperature 1, top-p 1 and a constant schedule unless given; null: the build's own)")
    ap.add_argument("--draw-sets", nargs="+", default=["canonical"], choices=shapes_run.PROMPT_SETS,
                    help="shapes-eval prompt sets to draw (default canonical), tuning scenes of each")
    ap.add_argument("--recon-options", default='{"guidance_scale": 3.0, "steps": 25}',
                    help="JSON decoder options for --recon")
    ap.add_argument("--a-caption-options", default="{}",
                    help='JSON caption options for --a over its caption_defaults, e.g. \'{"beams": 1}\' (greedy)')
    ap.add_argument("--b-caption-options", default="{}", help="the same for --b")
    args = ap.parse_args(argv)
    if not (args.captions or args.draw or args.recon):
        ap.error("give at least one of --captions N, --draw N, --recon N")
    for name in (args.a, args.b):
        if not Path(name).is_dir():
            ap.error(f"no checkpoint folder {name}")
    caption_options = {"a": json.loads(args.a_caption_options), "b": json.loads(args.b_caption_options)}
    draw = [(f"draw:{name}" if name != "canonical" else "draw", args.draw,
             lambda c, n, side, name=name: draw_verdicts(c, n, json.loads(args.draw_options), name))
            for name in dict.fromkeys(args.draw_sets)]
    tasks = [("captions", args.captions, lambda c, n, side: caption_verdicts(c, n, caption_options[side])), *draw,
             ("recon", args.recon, lambda c, n, side: recon_verdicts(c, n, json.loads(args.recon_options)))]
    rows = []
    for task, n, run in tasks:
        if not n:
            continue
        t0 = time.perf_counter()
        a, groups, *a_defaults = run(args.a, n, "a")
        b, _, *b_defaults = run(args.b, n, "b")
        row = {"task": task, "a": args.a, "b": args.b, **compare(a, b, groups),
               "seconds": round(time.perf_counter() - t0, 1)}
        if a_defaults != b_defaults:  # not only the weights differ: the sampling or caption options too
            row["options"] = {"a": a_defaults[0], "b": b_defaults[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
