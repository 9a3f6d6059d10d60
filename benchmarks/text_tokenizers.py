"""Text-world tokenizers side by side: the binary (lookup-free) text tokenizer against the patch VQ at the same
number of tokens, on the same scenes, next to the OCR ceiling of those scenes' own renderings.

For every tokenizer: OCR character error rate (CER) of its reconstructions (all, short 1-2 lines, long 3+
lines), colour and alignment checks, PSNR, bits per pixel (tokens x log2(vocabulary) / pixels) and
encode + decode seconds per image. The ceiling is Tesseract on the very images the tokenizers reconstruct, so
``cer_gap`` (tokenizer CER minus ceiling CER) compares like with like.

    .venv/bin/python benchmarks/text_tokenizers.py --tokenizers checkpoints/text_tokenizer runs/vq_text/tokenizer
    .venv/bin/python benchmarks/text_tokenizers.py --quick --tokenizers checkpoints/text_tokenizer   # 5 + 5 scenes

Ends with one JSON line: ``ceiling_cer`` and, per tokenizer (by folder), cer / cer_short / cer_long /
cer_gap / psnr / bits_per_pixel, and ``binary_beats_vq`` when one of each type is given.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.eval import text_eval  # noqa: E402
from mmgen.eval.text_run import eval_scenes  # noqa: E402
from mmgen.pipelines.text_to_image import load_tokenizer  # noqa: E402
from mmgen.tokenizers.vq_image import tensor_to_images  # noqa: E402


def judge_all(images, samples, desc: str) -> dict:
    results = [text_eval.judge(im, s.text, s.color, s.background, s.align)
               for im, s in tqdm(list(zip(images, samples)), desc=desc, leave=False)]
    return text_eval.summarize(results, [len(s.lines) for s in samples])


@torch.no_grad()
def reconstruct(tokenizer, samples, batch: int) -> tuple[list, float]:
    images, seconds = [], 0.0
    for i in range(0, len(samples), batch):
        chunk = [s.image for s in samples[i:i + batch]]
        t0 = time.perf_counter()
        out = tokenizer.decode(tokenizer.encode(chunk))
        seconds += time.perf_counter() - t0
        images += tensor_to_images(out)
    return images, seconds / len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", nargs="+", required=True, help="tokenizer folders (same canvas)")
    ap.add_argument("--n", type=int, default=None, help="short and long scenes each (default 40, --quick 5)")
    ap.add_argument("--quick", action="store_true", help="5 short and 5 long scenes")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if not text_eval.have_tesseract():
        raise SystemExit("error: needs the tesseract binary (Debian: tesseract-ocr tesseract-ocr-eng; make setup)")
    toks = {path: load_tokenizer(path).eval() for path in args.tokenizers}
    sizes = {t.config.image_size for t in toks.values()}
    if len(sizes) != 1:
        raise SystemExit(f"error: the tokenizers take different canvases {sorted(sizes)}; compare like with like")
    canvas = sizes.pop()
    samples = eval_scenes(args.n or (5 if args.quick else 40), canvas)
    ceiling = judge_all([s.image for s in samples], samples, "ocr originals")
    figures = {"canvas": canvas, "scenes": len(samples), "ceiling_cer": round(ceiling["all"]["cer"], 4),
               "ceiling": ceiling, "tokenizers": {}}
    print(json.dumps({"ceiling": ceiling}), file=sys.stderr)
    for path, tok in toks.items():
        images, sec = reconstruct(tok, samples, args.batch)
        res = judge_all(images, samples, f"ocr {path}")
        mse = np.mean([np.mean((np.asarray(a, float) - np.asarray(s.image, float)) ** 2)
                       for a, s in zip(images, samples)])
        row = {"type": tok.type_name, "tokens": tok.layout.num_tokens, "vocab": tok.vocab_size,
               "cer": round(res["all"]["cer"], 4),
               "cer_short": round(res["short"]["cer"], 4) if res["short"] else None,
               "cer_long": round(res["long"]["cer"], 4) if res["long"] else None,
               "cer_gap": round(res["all"]["cer"] - ceiling["all"]["cer"], 4),
               "color": res["all"]["color"], "alignment": res["all"]["alignment"],
               "psnr": round(float(10 * np.log10(255.0 ** 2 / max(mse, 1e-9))), 2),
               "bits_per_pixel": round(tok.layout.num_tokens * math.log2(tok.vocab_size) / canvas ** 2, 4),
               "seconds_per_image": round(sec, 4)}
        figures["tokenizers"][path] = row
        print(json.dumps({path: row}), file=sys.stderr)
    by_type = {row["type"]: row for row in figures["tokenizers"].values()}
    if "binary_text" in by_type and "vq_image" in by_type:
        figures["binary_beats_vq"] = by_type["binary_text"]["cer"] < by_type["vq_image"]["cer"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
