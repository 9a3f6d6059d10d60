"""Token-Shuffle at s = 1, 2, 4 on 256x256 text images, side by side in one run.

The same model width (the ``base`` size: d 256, 6 layers) over a binary text tokenizer's grid: 32x32 (1024
tokens of 8x8 pixels; the default) or, with ``--downsample 4``, the shipped recipe's 64x64 (4096 tokens of
4x4 pixels, ``tokenizers/binary_text.yaml``): sequence length, training tokens/s (text-world batches, the AR
trainer's loss), and generation
seconds per image at batch 1 and 8 (the pipeline's sampler with CFG). Speed does not depend on what the
weights learnt, so the models here are freshly initialised; CER needs trained checkpoints, given with
``--checkpoints S1 S2 S4`` (folders made by ``mmgen train ar`` with ``shuffle_window`` 1, 2, 4 on the text world);
without them the CER fields are null.

    .venv/bin/python benchmarks/token_shuffle.py --quick
    .venv/bin/python benchmarks/token_shuffle.py --quick --downsample 4     # the 64x64 grid: s = 1 is 4,403 positions
    .venv/bin/python benchmarks/token_shuffle.py --checkpoints runs/text_s1/pipeline runs/text_s2/pipeline runs/text_s4/pipeline

Ends with one JSON line: speedup_s2_vs_s1, speedup_s4_vs_s1 (batch 1 seconds per image), the batch-8 ratios,
training tokens/s, sequence lengths, cer_s1, cer_s2, cer_s4.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.data.shapes_data import text_world_batches  # noqa: E402
from mmgen.model.transformer import AR_CONFIGS, ARConfig, MMGenTransformer  # noqa: E402
from mmgen.model.vocab import Vocabulary  # noqa: E402
from mmgen.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from mmgen.text.encoder import SentenceEncoder  # noqa: E402
from mmgen.text.quoted import split_prompts  # noqa: E402
from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextTokenizer  # noqa: E402

TEXT_BYTES = 256  # the text world's quoted texts reach 219 bytes
PROMPT = 'a white card with the text "Hello world" in large blue serif letters, center aligned'


def build(tokenizer, window: int, text_bytes: int, head: str = "full") -> MMGenTransformer:
    """The ``base`` model over ``tokenizer``'s grid; ``head``: the image head (``ARConfig.image_head``)."""
    torch.manual_seed(0)
    vocab = Vocabulary.build({"image": tokenizer.vocab_size})
    positions = 48 + text_bytes + 2 + 2 + tokenizer.layout.num_tokens // window ** 2
    cfg = ARConfig(**{**asdict(AR_CONFIGS["base"]), "vocab": vocab.to_dict(), "shuffle_window": window,
                      "shuffle_grid": tuple(tokenizer.layout.grid), "text_bytes": text_bytes,
                      "max_positions": max(1536, positions), "image_head": head,
                      "image_bits": tokenizer.config.bits if head == "bitwise" else 0})
    return MMGenTransformer(cfg)


def train_step(model, opt, tokenizer, text, images, captions) -> tuple[float, int]:
    """One AdamW step of the trainer's loss on a text-world batch -> (seconds, image tokens); the encoders'
    work (tokenizer, sentence encoder) is left out of the seconds."""
    vocab = model.vocab
    rest, slot, _ = split_prompts(captions, vocab, model.config.text_bytes)  # as the trainer does
    with torch.no_grad():
        ids = vocab.to_unified("image", tokenizer.encode(images))
        cond = text(rest)
    t0 = time.perf_counter()
    prefix = model.prefix(cond.states, cond.mask)
    start = torch.cat([slot, torch.full((len(captions), 1), vocab.special("<boi>"))], 1)
    # the trainer's loss: every image token, through the model's own head (``MMGenTransformer.loss``)
    loss = model(prefix, start, image_ids=ids, target=ids)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, ids.numel()


def train_speed(model, tokenizer, text, steps: int, batch: int) -> float:
    """Training tokens (image tokens) per second over ``steps`` AdamW steps on text-world batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = text_world_batches(batch, 0, tokenizer.config.image_size)
    model.train()
    seconds, tokens = 0.0, 0
    for i in range(steps + 1):
        sec, n = train_step(model, opt, tokenizer, text, *next(batches))
        if i:  # the first step warms up
            seconds += sec
            tokens += n
    model.eval()
    return tokens / seconds


def gen_seconds(pipe, batch: int, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats):
        gens = [torch.Generator().manual_seed(r * 100 + k) for k in range(batch)]
        out = pipe([PROMPT] * batch, generator=gens, guidance_scale=3.0)
        best = min(best, out.record["seconds"] / batch)
    return best


def cer_of(checkpoint: str, n: int) -> float | None:
    from mmgen.eval.text_run import evaluate_text_to_image

    pipe = TextToImagePipeline.from_pretrained(checkpoint)
    return evaluate_text_to_image(pipe, n=n)["all"]["cer"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 training steps, 1 generation repeat")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--downsample", type=int, choices=[4, 8], default=8,
                    help="tokenizer patch side: 8 (32x32 grid, default) or 4 (64x64, the shipped text recipe)")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoints", nargs="+", help="trained text checkpoints for s = 1, 2, 4 (for CER)")
    ap.add_argument("--cer-n", type=int, default=20, help="short and long scenes each for CER")
    args = ap.parse_args()
    if args.quick:
        args.train_steps, args.repeats = 3, 1
    tokenizer = BinaryTextTokenizer(replace(BINARY_TEXT_CONFIGS["base"], downsample=args.downsample)).eval()
    text = SentenceEncoder(48)
    rows = {}
    for s in args.windows:
        model = build(tokenizer, s, TEXT_BYTES)
        pipe = TextToImagePipeline(tokenizer, model.eval(), text, {"guidance_scale": 3.0})
        rows[s] = {"window": s, "positions": 48 + TEXT_BYTES + 2 + 1 + tokenizer.layout.num_tokens // (s * s),
                   "train_tokens_per_s": round(train_speed(model, tokenizer, text, args.train_steps,
                                                           args.train_batch), 1),
                   "seconds_per_image_b1": round(gen_seconds(pipe, 1, args.repeats), 3),
                   "seconds_per_image_b8": round(gen_seconds(pipe, 8, args.repeats), 3)}
        print(json.dumps(rows[s]), file=sys.stderr)
    cers = {}
    if args.checkpoints:
        for s, ck in zip(args.windows, args.checkpoints):
            cers[s] = cer_of(ck, args.cer_n)
    base = rows.get(1)
    figures = {"tokens_per_image": tokenizer.layout.num_tokens, "image_size": tokenizer.config.image_size,
               "rows": list(rows.values())}
    for s in (2, 4):
        if base and s in rows:
            figures[f"speedup_s{s}_vs_s1"] = round(base["seconds_per_image_b1"] / rows[s]["seconds_per_image_b1"], 2)
            figures[f"speedup_s{s}_vs_s1_b8"] = round(base["seconds_per_image_b8"] / rows[s]["seconds_per_image_b8"], 2)
            figures[f"train_speedup_s{s}_vs_s1"] = round(rows[s]["train_tokens_per_s"] / base["train_tokens_per_s"], 2)
    for s in (1, 2, 4):
        figures[f"cer_s{s}"] = cers.get(s)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
