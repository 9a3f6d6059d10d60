"""ZipVL against dense attention, side by side in one run, on the shipped shapes checkpoint.

1. **Long prefill** (1k, 4k, 8k positions): the checkpoint's own weights read a long multi-image context, a
   prompt's prefix followed by world images' tokens one after another (<boi> image <eoi>, ...), the kind of
   input a storyboard or video gives. Dense: transformers' Llama layers with SDPA and a DynamicCache. ZipVL:
   the same layers with ZipVL's attention and cache. Reported per tau in {0.9, 0.95, 0.975, 1.0}: prefill
   seconds (best of ``--repeats``, dense and ZipVL interleaved), the kept ratio per layer, KV bytes against the
   dense cache (same dtype, fp32). The model was trained on about 120 positions; at 1k-8k its attention is
   whatever those weights give, so these lengths measure cost and selection, not image quality.
2. **Quality** at the lengths the model was trained for, same prompts and seeds for every setting:
   shapes-eval of text-to-image (canonical prompts) and of continuing a world image from its top half (the
   prefill then holds the prompt and 32 image positions).
3. A plot of the kept ratio per layer (``--plot``, PNG).

    .venv/bin/python benchmarks/zipvl.py --quick
    .venv/bin/python benchmarks/zipvl.py --n 50 --repeats 5

Ends with one JSON line: kv_bytes_ratio (ZipVL over dense at the default tau, text-to-image), prefill_speedup_4k,
metric_delta (ZipVL minus dense shapes-eval at the default tau, text-to-image), continuation_delta, and the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.eval import shapes_eval  # noqa: E402
from mmgen.eval.shapes_run import eval_scenes  # noqa: E402
from mmgen.model.zipvl import ZipVLCache, ZipVLOptions  # noqa: E402
from mmgen.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from mmgen.worlds import shapes  # noqa: E402

DEFAULT_TAU = 0.975


@torch.no_grad()
def long_context(pipe, length: int, seed: int = 0) -> torch.Tensor:
    """(1, length, d) input embeddings: a prompt's prefix, then world images' tokens one after another."""
    model, tok = pipe.model, pipe.tokenizer
    samples = list(shapes.generate(max(1, length // 60), seed, size=tok.config.image_size))
    parts = [pipe.encode_prompts([samples[0].caption])]
    boi, eoi = (torch.tensor([[model.vocab.special(s)]]) for s in ("<boi>", "<eoi>"))
    for s in samples:
        ids = model.vocab.to_unified(pipe.modality, tok.encode([s.image]))
        img = (model.shuffle.merge(model.embed(model.shuffle.to_windows(ids))) if model.shuffle is not None
               else model.embed(ids))
        parts += [model.embed(boi), img, model.embed(eoi)]
        if sum(p.shape[1] for p in parts) >= length:
            break
    return torch.cat(parts, 1)[:, :length]


@torch.no_grad()
def prefill_dense(model, x) -> tuple[float, int]:
    cache = DynamicCache(config=model.llama_config)
    t0 = time.perf_counter()
    model.llama(inputs_embeds=x, cache=cache, use_cache=True)
    seconds = time.perf_counter() - t0
    kv = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers)
    return seconds, kv


@torch.no_grad()
def prefill_zipvl(model, x, tau: float) -> tuple[float, dict]:
    cache = ZipVLCache(model.config.num_layers, ZipVLOptions(tau=tau))
    t0 = time.perf_counter()
    model._run_zipvl(x, cache)
    return time.perf_counter() - t0, cache.stats()


def quality(pipe, settings: dict, n: int, seed: int) -> dict:
    """shapes-eval of text-to-image and of top-half continuation per setting (same prompts, same seeds)."""
    samples = eval_scenes("canonical", n)
    truth = [(s.objects, s.background) for s in samples]
    h = pipe.tokenizer.layout.grid[0]
    out = {}
    for name, kw in settings.items():
        t2i, cont, recs = [], [], []
        for i in range(0, len(samples), 16):
            chunk = samples[i:i + 16]
            gens = lambda: [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]  # noqa: E731
            r = pipe([s.caption for s in chunk], generator=gens(), candidates=1, **kw)  # the samplers, not reranking
            t2i += r.images
            recs.append(r.record)
            c = pipe([s.caption for s in chunk], generator=gens(), image=[s.image for s in chunk],
                     keep_rows=h // 2, candidates=1, **kw)
            cont += c.images
            recs.append(c.record)
        z = [r["zipvl"] for r in recs if r.get("zipvl")]
        out[name] = {"t2i": shapes_eval.score(t2i, truth)["score"], "continuation": shapes_eval.score(cont, truth)["score"],
                     "kv_bytes_ratio_t2i": (sum(r["kv_bytes"] for r in z[0::2]) / sum(r["dense_kv_bytes"] for r in z[0::2])
                                            if z else 1.0),
                     "kv_bytes_ratio_continuation": (sum(r["kv_bytes"] for r in z[1::2]) /
                                                     sum(r["dense_kv_bytes"] for r in z[1::2]) if z else 1.0),
                     "kept_ratio_per_layer_t2i": z[0]["kept_ratio_per_layer"] if z else None}
        print(f"quality {name}: {out[name]}", file=sys.stderr)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["tau"] < 1.0:
            ax.plot(range(len(r["kept_ratio_per_layer"])), r["kept_ratio_per_layer"], marker="o",
                    label=f"{r['length']} positions, tau {r['tau']}")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept ratio (important tokens / all)")
    ax.set_ylim(0, 1.02)
    ax.set_title("ZipVL: important-token ratio per layer (shipped shapes checkpoint)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/shapes")
    ap.add_argument("--quick", action="store_true", help="8 prompts per object count, 2 repeats")
    ap.add_argument("--n", type=int, default=50, help="prompts per object count for the quality runs")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.95, 0.975, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--plot", default="outputs/benchmarks/zipvl_kept_ratio.png")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint)
    model = pipe.model

    rows = []
    for length in args.lengths:
        x = long_context(pipe, length, args.seed)
        prefill_dense(model, x[:, :256])  # warm-up
        best = {"dense": float("inf"), **{t: float("inf") for t in args.taus}}
        stats, dense_kv = {}, 0
        for _ in range(args.repeats):
            s, dense_kv = prefill_dense(model, x)
            best["dense"] = min(best["dense"], s)
            for tau in args.taus:
                s, stats[tau] = prefill_zipvl(model, x, tau)
                best[tau] = min(best[tau], s)
        for tau in args.taus:
            row = {"length": length, "tau": tau, "dense_s": round(best["dense"], 4), "zipvl_s": round(best[tau], 4),
                   "speedup": round(best["dense"] / best[tau], 3),
                   "kept_ratio_per_layer": stats[tau]["kept_ratio_per_layer"],
                   "kv_bytes_ratio": round(stats[tau]["kv_bytes"] / dense_kv, 4)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    plot(rows, Path(args.plot))

    settings = {"dense": {}, **{f"tau {t}": {"zipvl_tau": t, "kv_bits": "4/2"} for t in args.taus}}
    q = quality(pipe, settings, args.n, args.seed)
    default = f"tau {DEFAULT_TAU}"
    at = {r["length"]: r for r in rows if r["tau"] == DEFAULT_TAU}
    figures = {
        "checkpoint": args.checkpoint, "n_per_object_count": args.n, "threads": torch.get_num_threads(),
        "kv_bytes_ratio": round(q[default]["kv_bytes_ratio_t2i"], 4) if default in q else None,
        "kv_bytes_ratio_continuation": round(q[default]["kv_bytes_ratio_continuation"], 4) if default in q else None,
        "prefill_speedup_4k": at[4096]["speedup"] if 4096 in at else None,
        "prefill_speedup_by_length": {L: r["speedup"] for L, r in at.items()},
        "kv_bytes_ratio_by_length": {L: r["kv_bytes_ratio"] for L, r in at.items()},
        "mean_kept_ratio_by_length": {L: round(sum(r["kept_ratio_per_layer"]) / len(r["kept_ratio_per_layer"]), 4)
                                      for L, r in at.items()},
        "metric_delta": round(q[default]["t2i"] - q["dense"]["t2i"], 4) if default in q else None,
        "continuation_delta": round(q[default]["continuation"] - q["dense"]["continuation"], 4) if default in q else None,
        "score_dense": q["dense"]["t2i"], "score_zipvl": q[default]["t2i"] if default in q else None,
        "quality": q, "prefill": rows, "plot": args.plot,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
