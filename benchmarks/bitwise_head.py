"""The bitwise image head against the full head, side by side in one run, on the shipped text recipe's shape.

The model of ``recipes/text_ar_ts4.yaml`` (the ``base`` size, Token-Shuffle s = 4, a 256-byte slot) over the
binary text tokenizer's 64x64 grid of 13-bit ids, built twice: with the full head (a learnt logit row for each
of the 8,464 unified ids) and with the bitwise head (13 bit logits for the 8,192 image ids, a learnt row for
each of the other 272; ``MMGenTransformer.logits``). Reported: parameters, training seconds per step and image
tokens per second (text-world batches, the trainer's loss), and generation seconds per image at batch 1 and 8 (the pipeline's sampler with CFG). The two models' steps are interleaved,
one of each in turn, and the median is kept, so a noisy machine slows both alike. Speed does not depend on what
the weights learnt, so the models are freshly initialised (the tokenizer too).

    .venv/bin/python benchmarks/bitwise_head.py --quick
    .venv/bin/python benchmarks/bitwise_head.py --train-steps 6 --repeats 2

Ends with one JSON line: per head its row, and ``train_speedup_bitwise_vs_full``, ``gen_speedup_bitwise_vs_full``
(batch 8) and ``gen_speedup_bitwise_vs_full_b1``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.token_shuffle import PROMPT, TEXT_BYTES, build, train_step  # noqa: E402
from mmgen.data.shapes_data import text_world_batches  # noqa: E402
from mmgen.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from mmgen.text.encoder import SentenceEncoder  # noqa: E402
from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextTokenizer  # noqa: E402

HEADS = ("full", "bitwise")


def step_seconds(models: dict, tokenizer, text, steps: int, batch: int) -> dict:
    """Median seconds of an AdamW step for each model, the models' steps interleaved on the same batches."""
    opts = {h: torch.optim.AdamW(m.parameters(), lr=1e-4) for h, m in models.items()}
    batches = text_world_batches(batch, 0, tokenizer.config.image_size)
    times = {h: [] for h in models}
    for m in models.values():
        m.train()
    for i in range(steps + 1):
        images, captions = next(batches)
        for h, model in models.items():
            sec, _ = train_step(model, opts[h], tokenizer, text, images, captions)
            if i:  # the first step warms up
                times[h].append(sec)
    for m in models.values():
        m.eval()
    return {h: statistics.median(t) for h, t in times.items()}


def gen_seconds(pipes: dict, batch: int, repeats: int) -> dict:
    """Best seconds per image for each pipeline, interleaved."""
    best = {h: float("inf") for h in pipes}
    for r in range(repeats):
        for h, pipe in pipes.items():
            gens = [torch.Generator().manual_seed(r * 100 + k) for k in range(batch)]
            out = pipe([PROMPT] * batch, generator=gens, guidance_scale=3.0)
            best[h] = min(best[h], out.record["seconds"] / batch)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed training steps, 1 generation repeat")
    ap.add_argument("--window", type=int, default=4, help="Token-Shuffle window (the text recipe's 4)")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.train_steps, args.repeats = 2, 1
    tokenizer = BinaryTextTokenizer(replace(BINARY_TEXT_CONFIGS["base"], downsample=4)).eval()  # 64x64 grid
    text = SentenceEncoder(48)
    models = {h: build(tokenizer, args.window, TEXT_BYTES, h) for h in HEADS}
    train = step_seconds(models, tokenizer, text, args.train_steps, args.train_batch)
    pipes = {h: TextToImagePipeline(tokenizer, m.eval(), text, {"guidance_scale": 3.0}) for h, m in models.items()}
    b1, b8 = gen_seconds(pipes, 1, args.repeats), gen_seconds(pipes, 8, args.repeats)
    n_tokens = args.train_batch * tokenizer.layout.num_tokens
    rows = {h: {"head": h, "parameters": models[h].num_parameters(),
                "train_seconds_per_step": round(train[h], 3),
                "train_image_tokens_per_s": round(n_tokens / train[h], 1),
                "seconds_per_image_b1": round(b1[h], 3), "seconds_per_image_b8": round(b8[h], 3)}
            for h in HEADS}
    for row in rows.values():
        print(json.dumps(row), file=sys.stderr)
    figures = {"window": args.window, "tokens_per_image": tokenizer.layout.num_tokens,
               "train_batch": args.train_batch, "train_steps_timed": args.train_steps, "rows": list(rows.values()),
               "train_speedup_bitwise_vs_full": round(train["full"] / train["bitwise"], 2),
               "gen_speedup_bitwise_vs_full": round(b8["full"] / b8["bitwise"], 2),
               "gen_speedup_bitwise_vs_full_b1": round(b1["full"] / b1["bitwise"], 2)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
