"""CLIP reranking (``candidates``) of a text-to-image checkpoint with a judge, measured prompt by prompt.

Every prompt of each prompt set is drawn K times, exactly as ``TextToImagePipeline(..., candidates=K)`` draws
its candidates (one generator per prompt, seeded with its index, going on from candidate to candidate), and
each candidate is judged by shapes-eval. Reported per prompt set and K in ``--ks``: the shapes-eval score of the
first candidate (what ``candidates=1`` returns), the mean over the K candidates, the oracle (any of the K right)
and the judge's pick, with the exact sign test of the pick against the first candidate on the prompts only one
of them gets right. Then one timed call of the pipeline at each K, side by side, which must return the very
pick computed here (checked). Tuning scenes by default (``tune_sampling.TUNING_SEED``); ``--reported`` uses
the evaluation's scenes (``shapes_run.EVAL_SEED``), as ``mmgen eval shapes`` does.

    .venv/bin/python benchmarks/clip_rerank.py --checkpoint checkpoints/shapes --n 30 --ks 1 2 4 8

Ends with one JSON line: per prompt set and K, first / mean / oracle / reranked, a_only / b_only / p_sign,
and seconds per image (wall clock of a pipeline call at batch ``--batch``, drawing, decoding and judging).
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

from tune_sampling import TUNING_SEED  # noqa: E402

from mmgen.eval import shapes_eval, shapes_run  # noqa: E402
from mmgen.eval.paired import compare  # noqa: E402
from mmgen.tokenizers.vq_image import tensor_to_images  # noqa: E402

PROMPT_SETS = ("canonical", "held_out_combos", "held_out_wording", "paraphrase_held_out")


@torch.no_grad()
def candidates_judged(pipe, scenes, k: int, batch: int, keep: bool = False):
    """-> (shapes-eval verdicts (n, k), judge scores (n, k), with ``keep`` the candidates (n, k, 3, H, W))
    of every prompt's k candidates."""
    ok, score, kept = torch.zeros(len(scenes), k), torch.zeros(len(scenes), k), []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        prompts = [s.caption for s in chunk]
        gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        for c in range(k):
            pixels = pipe(prompts, generator=gens, candidates=1, output_type="pt").images
            if keep:
                kept.append((i, c, pixels))
            score[i:i + len(chunk), c] = pipe.judge.clip_score(pixels, prompts).float()
            ok[i:i + len(chunk), c] = torch.tensor([
                float(shapes_eval.judge(im, s.objects, s.background)["satisfied"])
                for im, s in zip(tensor_to_images(pixels), chunk)])
    if not keep:
        return ok, score, None
    pixels = torch.zeros(len(scenes), k, *kept[0][2].shape[1:])
    for i, c, x in kept:
        pixels[i:i + len(x), c] = x
    return ok, score, pixels


def pick(score: torch.Tensor, k: int) -> torch.Tensor:
    """The candidate the pipeline keeps among the first k: the highest score, the earliest of ties."""
    s = score[:, :k]
    return (s == s.max(1, keepdim=True).values).float().argmax(1)


@torch.no_grad()
def timed(pipe, scenes, k: int, batch: int) -> tuple[float, torch.Tensor]:
    """Seconds per image of pipeline calls with candidates=k, and the images (n, 3, H, W) they return."""
    out, t0 = [], time.perf_counter()
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        out.append(pipe([s.caption for s in chunk], generator=gens, candidates=k, output_type="pt").images)
    return (time.perf_counter() - t0) / len(scenes), torch.cat(out)


def main(argv=None) -> dict:
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/shapes", help="a text-to-image checkpoint with a judge")
    ap.add_argument("--n", type=int, default=30, help="prompts per object count and prompt set (default 30)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="candidate counts (default 1 2 4 8)")
    ap.add_argument("--prompt-sets", nargs="+", default=list(PROMPT_SETS), choices=PROMPT_SETS)
    ap.add_argument("--batch", type=int, default=30, help="prompts per pipeline call (default 30)")
    ap.add_argument("--timed-n", type=int, default=10,
                    help="canonical prompts per object count for the timed calls (default 10; 0: skip)")
    ap.add_argument("--reported", action="store_true", help="the evaluation's scenes instead of the tuning ones")
    args = ap.parse_args(argv)
    if args.n < 1 or any(k < 1 for k in args.ks):
        ap.error("--n and every K must be positive")
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint)
    if pipe.judge is None:
        raise SystemExit(f"error: {args.checkpoint} has no judge CLIP (model_index.json 'judge')")
    seed = shapes_run.EVAL_SEED if args.reported else TUNING_SEED
    kmax = max(args.ks)
    report = {"checkpoint": args.checkpoint, "scenes_seed": seed, "n": args.n, "sets": {}}
    for ps in args.prompt_sets:
        scenes = shapes_run.eval_scenes(ps, args.n, seed=seed)
        ok, score, _ = candidates_judged(pipe, scenes, kmax, args.batch)
        counts = [len(s.objects) for s in scenes]
        rows = {}
        for k in sorted(set(args.ks)):
            chosen = ok[torch.arange(len(scenes)), pick(score, k)]
            paired = compare(ok[:, 0].bool().tolist(), chosen.bool().tolist(), counts)
            rows[str(k)] = {"first": round(ok[:, 0].mean().item(), 4), "mean": round(ok[:, :k].mean().item(), 4),
                            "oracle": round(ok[:, :k].max(1).values.mean().item(), 4),
                            "reranked": round(chosen.mean().item(), 4),
                            "reranked_by_count": [round(chosen[torch.tensor(counts) == c].mean().item(), 4)
                                                  for c in (1, 2, 3)],
                            "a_only": paired["a_only"], "b_only": paired["b_only"], "p_sign": paired["p_sign"]}
            print(f"{ps:20s} K={k}: first {rows[str(k)]['first']:.3f} mean {rows[str(k)]['mean']:.3f} "
                  f"oracle {rows[str(k)]['oracle']:.3f} reranked {rows[str(k)]['reranked']:.3f} "
                  f"(lost {paired['a_only']}, gained {paired['b_only']}, p {paired['p_sign']})", flush=True)
        report["sets"][ps] = rows
    if args.timed_n:
        scenes = shapes_run.eval_scenes("canonical", args.timed_n, seed=seed)
        _, score, pixels = candidates_judged(pipe, scenes, kmax, args.batch, keep=True)
        report["seconds_per_image"] = {}
        for k in sorted(set(args.ks)):
            seconds, images = timed(pipe, scenes, k, args.batch)
            if not torch.equal(images, pixels[torch.arange(len(scenes)), pick(score, k)]):
                raise SystemExit(f"error: the pipeline's pick at K={k} differs from this benchmark's")
            report["seconds_per_image"][str(k)] = round(seconds, 4)
            print(f"K={k}: {seconds:.3f} s an image (batch {args.batch}); the pipeline's picks match", flush=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
