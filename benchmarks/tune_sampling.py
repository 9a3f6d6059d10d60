"""Pick a checkpoint's sampling defaults on a tuning prompt set, never on the reported evaluation prompts.

Runs shapes-eval (canonical captions) for a small grid of sampling options on scenes drawn with seed
777000 (the reported evaluation uses mmgen/eval/shapes_run.EVAL_SEED), one JSON line per setting. With
``--world text`` it runs text-eval (OCR CER, colour and alignment checks) on n short and n long text scenes
drawn with seed 950001 (the reported ones use mmgen/eval/text_run.TEXT_EVAL_SEED, 900201). With
``--decoder`` (a SEED checkpoint) it tunes the diffusion decoder instead: shapes-eval of reconstructions
(tokens -> decoder) of the tuning scenes for a grid of guidance scales and sampler steps. With
``--captions`` (a checkpoint that sees) it tunes captioning: accuracy on scenes drawn with seed 920001 (the
reported ones use mmgen/eval/caption.CAPTION_EVAL_SEED, 910001) for greedy decoding and beam searches, plain
and reranked by the drawing direction (``rerank``); each row has its seconds, all in one run.

    .venv/bin/python benchmarks/tune_sampling.py --checkpoint runs/shapes_ar_ts2/pipeline --n 16
    .venv/bin/python benchmarks/tune_sampling.py --world text --checkpoint runs/text_ar_ts4/pipeline --n 4
    .venv/bin/python benchmarks/tune_sampling.py --decoder --checkpoint checkpoints/seed --n 16
    .venv/bin/python benchmarks/tune_sampling.py --captions --checkpoint checkpoints/seed --n 16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.eval import shapes_eval, shapes_run  # noqa: E402
from mmgen.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

TUNING_SEED = 777_000
CAPTION_TUNING_SEED = 920_001
TEXT_TUNING_SEED = 950_001  # far from every training stream's seeds (small multiples of 1000 plus a rank)
TEXT_GRID = (
    dict(guidance_scale=3.0, cfg_schedule="linear"),
    dict(guidance_scale=3.0, cfg_schedule="linear", temperature=0.7, top_k=5),
    dict(guidance_scale=1.5, temperature=0.7, top_k=5),
    dict(guidance_scale=5.0, cfg_schedule="linear", temperature=0.7, top_k=5),
)
GRID = (
    dict(guidance_scale=1.0, top_k=1),
    dict(guidance_scale=1.5, top_k=1),
    dict(guidance_scale=3.0, top_k=1),
    dict(guidance_scale=3.0, top_k=1, cfg_schedule="linear"),
    dict(guidance_scale=5.0, top_k=1, cfg_schedule="linear"),
    dict(guidance_scale=3.0, top_k=0, temperature=1.0),
    dict(guidance_scale=2.0, top_k=5, temperature=0.7),
)
DECODER_GRID = tuple(dict(guidance_scale=g, steps=25) for g in (2.0, 3.0, 5.0, 7.5)) + (
    dict(guidance_scale=5.0, steps=50),)
# greedy, beam search, beam search reranked by the drawing direction (ImageToTextPipeline's rerank), and with
# mirror test-time augmentation (mirror); each option the checkpoint's caption_defaults would otherwise fill is given
CAPTION_GRID = (dict(beams=1),) + tuple(dict(beams=8, rerank=w, mirror=False) for w in (0.0, 0.5, 1.0, 2.0)) + (
    dict(beams=16, rerank=1.0, mirror=False), dict(beams=8, rerank=0.0, mirror=True),
    dict(beams=8, rerank=1.0, mirror=True))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--world", choices=("shapes", "text"), default="shapes")
    ap.add_argument("--n", type=int, default=16, help="prompts per object count; text: short and long scenes "
                                                     "each (default 16)")
    ap.add_argument("--decoder", action="store_true",
                    help="tune a SEED checkpoint's diffusion decoder on reconstructions (guidance_scale, steps)")
    ap.add_argument("--captions", action="store_true",
                    help="tune captioning of a checkpoint that also sees (greedy against beam search)")
    ap.add_argument("--grid", help='JSON list of option sets instead of the built-in grid, e.g. '
                                   '\'[{"guidance_scale": 1.5, "top_k": 1}]\'')
    args = ap.parse_args(argv)
    if (args.decoder or args.captions) and args.world == "text":
        ap.error("--decoder and --captions tune SEED on the shapes world; leave out --world text")
    if args.decoder and args.captions:
        ap.error("give --decoder or --captions, not both")
    grid = json.loads(args.grid) if args.grid else (
        DECODER_GRID if args.decoder else CAPTION_GRID if args.captions else TEXT_GRID if args.world == "text"
        else GRID)
    if args.captions:
        return tune_captions(args.checkpoint, grid, args.n)
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint)
    if args.decoder:
        return tune_decoder(pipe.tokenizer, grid, args.n)
    if args.world == "text":
        return tune_text(pipe, grid, args.n)
    scenes = shapes_run.eval_scenes("canonical", args.n, seed=TUNING_SEED)
    rows = []
    for kw in grid:
        # the sampler alone unless a row asks for CLIP reranking ({"candidates": K})
        options = {"temperature": 1.0, "top_p": 1.0, "cfg_schedule": "constant", "candidates": 1, **kw}
        images = []
        for i in range(0, len(scenes), 32):
            chunk = scenes[i:i + 32]
            images += pipe([s.caption for s in chunk], generator=torch.Generator().manual_seed(i), **options).images
        res = shapes_eval.score(images, [(s.objects, s.background) for s in scenes])
        row = {"options": options, "score": round(res["score"], 4), "by_objects": res["by_objects"],
               "errors": res["errors"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def tune_captions(checkpoint: str, grid, n: int) -> list[dict]:
    from mmgen.eval.caption import evaluate_captions
    from mmgen.pipelines.image_to_text import ImageToTextPipeline

    pipe = ImageToTextPipeline.from_pretrained(checkpoint)
    rows = []
    for kw in grid:
        t0 = time.perf_counter()
        res = evaluate_captions(pipe, n=n, seed=CAPTION_TUNING_SEED, **kw)
        row = {"options": kw, "seconds": round(time.perf_counter() - t0, 2),
               **{k: v for k, v in res.items() if k != "examples"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def tune_decoder(tokenizer, grid, n: int) -> list[dict]:
    if not getattr(tokenizer, "decode_needs_generator", False):
        raise SystemExit("error: --decoder needs a checkpoint with a diffusion decoder (SEED)")
    rows = []
    for kw in grid:
        res = shapes_run.evaluate_reconstruction(tokenizer, n=n, seed=TUNING_SEED, batch=16, **kw)
        row = {"options": kw, "score": round(res["score"], 4), "by_objects": res["by_objects"],
               "errors": res["errors"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def tune_text(pipe, grid, n: int) -> list[dict]:
    from mmgen.eval.text_run import evaluate_text_to_image

    rows = []
    for kw in grid:
        options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_schedule": "constant", **kw}
        res = evaluate_text_to_image(pipe, n=n, seed=0, scenes_seed=TEXT_TUNING_SEED, **options)
        row = {"options": options, "cer": round(res["all"]["cer"], 4), "cer_short": round(res["short"]["cer"], 4),
               "color": res["all"]["color"], "alignment": res["all"]["alignment"],
               "stray_ink": res["all"]["stray_ink"], "seconds_per_image": round(res["seconds_per_image"], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
