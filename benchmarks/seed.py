"""SEED (32 causal semantic tokens + diffusion decoder) against the patch VQ tokenizer, side by side in one run.

Two shipped checkpoints on the same world: ``checkpoints/seed`` (SEED tokenizer, one AR model that draws and
sees) and ``checkpoints/shapes`` (the patch VQ, 256 tokens, Token-Shuffle s = 2, draws only). Reported:
tokens per image and AR positions per image; reconstruction shapes-eval (tokens -> pixels: SEED through its
diffusion decoder, VQ through its decoder); text-to-image shapes-eval on the canonical prompts by object
count; generation seconds per image at batch 8 (AR + decoder, one run); captioning accuracy of the SEED
model (every attribute right, by object count); what the CLIP tower and the SEED codes can tell apart
(attribute retrieval, and a small probe trained on the 32 ids; ``mmgen/eval/clip_probe.py``).

    .venv/bin/python benchmarks/seed.py --quick      # 16 per object count
    .venv/bin/python benchmarks/seed.py --n 50

Ends with one JSON line: caption_acc_1obj, caption_acc_2obj, caption_acc_3obj, recon_shapes_eval,
recon_shapes_eval_vq, t2i_shapes_eval_1obj, t2i_shapes_eval, t2i_shapes_eval_1obj_vq, t2i_shapes_eval_vq,
seconds_per_image_seed, seconds_per_image_vq, tokens_per_image_seed, tokens_per_image_vq.
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

from mmgen.eval.caption import evaluate_captions  # noqa: E402
from mmgen.eval.clip_probe import attribute_retrieval, seed_attribute_retrieval, seed_code_probe  # noqa: E402
from mmgen.eval.shapes_run import evaluate_reconstruction, evaluate_text_to_image  # noqa: E402
from mmgen.pipelines.image_to_text import ImageToTextPipeline  # noqa: E402
from mmgen.pipelines.text_to_image import TextToImagePipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 scenes per object count")
    ap.add_argument("--n", type=int, default=50, help="scenes per object count (default 50)")
    ap.add_argument("--seed-checkpoint", default=str(ROOT / "checkpoints" / "seed"))
    ap.add_argument("--vq-checkpoint", default=str(ROOT / "checkpoints" / "shapes"))
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    n = 16 if args.quick else args.n
    torch.manual_seed(0)
    pipes = {"seed": TextToImagePipeline.from_pretrained(args.seed_checkpoint),
             "vq": TextToImagePipeline.from_pretrained(args.vq_checkpoint)}
    rows = {}
    for name, pipe in pipes.items():
        t0 = time.perf_counter()
        t2i = evaluate_text_to_image(pipe, "canonical", n=n, seed=0, batch=8)
        wall = time.perf_counter() - t0
        recon = evaluate_reconstruction(pipe.tokenizer, n=n, batch=8)
        positions = pipe.tokenizer.layout.num_tokens // pipe.model.tokens_per_step
        rows[name] = {"tokens_per_image": pipe.tokenizer.layout.num_tokens, "ar_positions": positions,
                      "recon": recon["score"], "recon_by_count": recon["by_objects"], "recon_psnr": recon["psnr"],
                      "t2i": t2i["score"], "t2i_by_count": t2i["by_objects"],
                      "seconds_per_image": wall / (3 * n)}
        print(f"{name:5s} tokens {rows[name]['tokens_per_image']:4d} positions {positions:4d} "
              f"recon {recon['score']:.3f} t2i {t2i['score']:.3f} {t2i['by_objects']} "
              f"{rows[name]['seconds_per_image']:.3f} s/image", flush=True)
    seed_pipe = pipes["seed"]
    captions = evaluate_captions(ImageToTextPipeline.from_text_to_image(seed_pipe), n=n)
    print("captioning:", json.dumps({k: v for k, v in captions.items() if k != "examples"}))
    for ex in captions["examples"]:
        print(f"  truth:   {ex['truth']}\n  caption: {ex['caption']}  ({'right' if ex['correct'] else 'wrong'})")
    probe = attribute_retrieval(seed_pipe.tokenizer.clip, n=4 * n)
    print("CLIP attribute retrieval (one-object images):", json.dumps(probe))
    seed_probe = seed_attribute_retrieval(seed_pipe.tokenizer, n=4 * n)
    print("SEED codes attribute retrieval (one-object images):", json.dumps(seed_probe))
    code_probe = seed_code_probe(seed_pipe.tokenizer)
    print("SEED codes, probe trained on the ids (held-out accuracy):", json.dumps(code_probe))

    def by(row, k):
        return (row["t2i_by_count"] or {}).get(str(k), (row["t2i_by_count"] or {}).get(k))

    figures = {
        "n_per_count": n,
        "tokens_per_image_seed": rows["seed"]["tokens_per_image"], "tokens_per_image_vq": rows["vq"]["tokens_per_image"],
        "ar_positions_seed": rows["seed"]["ar_positions"], "ar_positions_vq": rows["vq"]["ar_positions"],
        "recon_shapes_eval": rows["seed"]["recon"], "recon_shapes_eval_vq": rows["vq"]["recon"],
        "t2i_shapes_eval": rows["seed"]["t2i"], "t2i_shapes_eval_vq": rows["vq"]["t2i"],
        "t2i_shapes_eval_1obj": by(rows["seed"], 1), "t2i_shapes_eval_1obj_vq": by(rows["vq"], 1),
        "seconds_per_image_seed": rows["seed"]["seconds_per_image"],
        "seconds_per_image_vq": rows["vq"]["seconds_per_image"],
        "caption_acc": captions["accuracy"], "caption_acc_1obj": captions["accuracy_1obj"],
        "caption_acc_2obj": captions["accuracy_2obj"], "caption_acc_3obj": captions["accuracy_3obj"],
        "clip_retrieval": probe, "seed_codes_retrieval": seed_probe, "seed_code_probe": code_probe,
    }
    line = json.dumps(figures)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
