"""Text-world tokenizers side by side: the binary (lookup-free) text tokenizer against the patch VQ at the same
number of tokens, on the same scenes, next to the OCR ceiling of those scenes' own renderings.

For every tokenizer: OCR character error rate (CER) of its reconstructions (all, short 1-2 lines, long 3+
lines), colour and alignment checks, PSNR, bits per pixel (tokens x log2(vocabulary) / pixels) and
encode + decode seconds per image. The ceiling is Tesseract on the very images the tokenizers reconstruct, so
``cer_gap`` (tokenizer CER minus ceiling CER) compares like with like.

``card_off``: of the blank card (the tokens whose pixels are all the page's background colour), the share of
pixels the reconstruction puts more than 30 levels (summed over R, G, B) from that colour: the threshold the
colour and alignment checks count as ink, so every such pixel is read as ink; by background too.
``card_texture``: on the same blank card, the mean distance (levels summed over R, G, B) of a reconstructed
pixel from the card colour: faint block texture below the 30 levels that ``card_off`` counts, which
Tesseract still reads as letters on a near-empty page.
``--crop-probe`` (binary tokenizers) also encodes each page's top-left 64x64 corner alone, as the crop-trained
recipes train, and compares ``card_off`` there with the same corner encoded inside the whole page: a tokenizer
that takes the card colour from a crop's border decodes the corner right alone and wrong in the page; it
also reports ``card_top_ids``, per background the ids most used for blank-card tokens (one id shared by two
card colours leaves the decoder to guess which). ``--per-page`` prints each page's CER for every tokenizer.

    .venv/bin/python benchmarks/text_tokenizers.py --tokenizers checkpoints/text_tokenizer runs/vq_text/tokenizer
    .venv/bin/python benchmarks/text_tokenizers.py --quick --tokenizers checkpoints/text_tokenizer   # 5 + 5 scenes

Ends with one JSON line: ``ceiling_cer`` and, per tokenizer (by folder), cer / cer_short / cer_long /
cer_gap / psnr / bits_per_pixel / card_off / card_texture (and the crop probe's figures), and ``binary_beats_vq``
when one of each type is given.
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
from mmgen.eval.text_run import TEXT_EVAL_SEED, eval_scenes  # noqa: E402
from mmgen.pipelines.text_to_image import load_tokenizer  # noqa: E402
from mmgen.tokenizers.vq_image import images_to_tensor, tensor_to_images  # noqa: E402
from mmgen.worlds.text import BACKGROUNDS  # noqa: E402

OFF_LEVELS = 30  # text_eval's ink threshold: summed |RGB - background| above this is ink


def judge_all(images, samples, desc: str, pages: list | None = None) -> dict:
    """text-eval's summary of the pages; ``pages``: a list to which each page's CER is appended."""
    results = [text_eval.judge(im, s.text, s.color, s.background, s.align)
               for im, s in tqdm(list(zip(images, samples)), desc=desc, leave=False)]
    if pages is not None:
        pages += [round(r["cer"], 3) for r in results]
    return text_eval.summarize(results, [len(s.lines) for s in samples])


@torch.no_grad()
def card_top_ids(tokenizer, samples, k: int = 3) -> dict:
    """Per background, the ``k`` ids most used for blank-card tokens, with their share of those tokens."""
    counts = {}
    cell = tokenizer.config.downsample
    for s in samples:
        ids = tokenizer.encode([s.image])[0].reshape(tokenizer.layout.grid)
        mask, _ = card_masks(s.image, s.background, cell)
        flat = torch.from_numpy(mask[::cell, ::cell].copy())
        c = counts.setdefault(s.background, {})
        for i in ids[flat].tolist():
            c[i] = c.get(i, 0) + 1
    return {bg: [[i, round(n / sum(c.values()), 3)] for i, n in sorted(c.items(), key=lambda kv: -kv[1])[:k]]
            for bg, c in counts.items()}


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


def card_masks(original, background: str, cell: int, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of whole blank-card token cells, the background colour) of a page, or of its top-left ``window``
    pixels."""
    a = np.asarray(original, dtype=float)
    if window:
        a = a[:window, :window]
    bg = np.array(BACKGROUNDS[background], dtype=float)
    flat = (a == bg).all(-1)
    h, w = flat.shape
    cells = flat.reshape(h // cell, cell, w // cell, cell).all((1, 3))
    return np.kron(cells, np.ones((cell, cell), dtype=bool)).astype(bool), bg


def card_off(images, samples, cell: int, window: int | None = None, texture: bool = False) -> dict:
    """Share of blank-card pixels reconstructed off the card colour, over all pages and by background; with
    ``texture``, their mean distance from it in levels (summed over R, G, B) instead."""
    off, total = {}, {}
    for im, s in zip(images, samples):
        mask, bg = card_masks(s.image, s.background, cell, window)
        r = np.asarray(im, dtype=float)[:mask.shape[0], :mask.shape[1]]
        dist = np.abs(r - bg).sum(-1)
        bad = dist[mask].sum() if texture else int(((dist > OFF_LEVELS) & mask).sum())
        for key in ("all", s.background):
            off[key] = off.get(key, 0) + bad
            total[key] = total.get(key, 0) + int(mask.sum())
    return {k: round(float(off[k]) / total[k], 4 if not texture else 2) for k in total if total[k]}


@torch.no_grad()
def corner_alone(tokenizer, samples, window: int = 64) -> list:
    """Each page's top-left ``window`` x ``window`` pixels encoded and decoded alone, at their page positions
    (the way the crop-trained recipes train)."""
    out = []
    offset = torch.zeros(1, 2, dtype=torch.long)
    for s in samples:
        x = images_to_tensor([s.image])[..., :window, :window].to(tokenizer.device)
        recon, _, _ = tokenizer(x, offset=offset.to(tokenizer.device))
        out += tensor_to_images(recon)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", nargs="+", required=True, help="tokenizer folders (same canvas)")
    ap.add_argument("--n", type=int, default=None, help="short and long scenes each (default 40, --quick 5)")
    ap.add_argument("--quick", action="store_true", help="5 short and 5 long scenes")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--per-page", action="store_true", help="print every page's CER for each tokenizer")
    ap.add_argument("--scenes-seed", type=int, default=TEXT_EVAL_SEED,
                    help="seed of the scenes (default text-eval's; another, e.g. 950001, to choose between "
                         "tokenizers without looking at the reported scenes)")
    ap.add_argument("--crop-probe", action="store_true",
                    help="binary tokenizers: card_off of each page's top-left 64x64 encoded alone vs in the page")
    args = ap.parse_args()
    if not text_eval.have_tesseract():
        raise SystemExit("error: needs the tesseract binary (Debian: tesseract-ocr tesseract-ocr-eng; make setup)")
    toks = {path: load_tokenizer(path).eval() for path in args.tokenizers}
    sizes = {t.config.image_size for t in toks.values()}
    if len(sizes) != 1:
        raise SystemExit(f"error: the tokenizers take different canvases {sorted(sizes)}; compare like with like")
    canvas = sizes.pop()
    samples = eval_scenes(args.n or (5 if args.quick else 40), canvas, seed=args.scenes_seed)
    ceiling = judge_all([s.image for s in samples], samples, "ocr originals")
    figures = {"canvas": canvas, "scenes": len(samples), "scenes_seed": args.scenes_seed,
               "ceiling_cer": round(ceiling["all"]["cer"], 4),
               "ceiling": ceiling, "tokenizers": {}}
    print(json.dumps({"ceiling": ceiling}), file=sys.stderr)
    per_page = {}
    for path, tok in toks.items():
        images, sec = reconstruct(tok, samples, args.batch)
        res = judge_all(images, samples, f"ocr {path}", per_page.setdefault(path, []))
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
               "seconds_per_image": round(sec, 4),
               "card_off": card_off(images, samples, tok.config.downsample),
               "card_texture": card_off(images, samples, tok.config.downsample, texture=True)}
        if args.crop_probe and tok.type_name == "binary_text":
            row["card_off_corner_in_page"] = card_off(images, samples, tok.config.downsample, 64)
            row["card_off_corner_alone"] = card_off(corner_alone(tok, samples), samples, tok.config.downsample, 64)
            row["card_top_ids"] = card_top_ids(tok, samples)
        figures["tokenizers"][path] = row
        print(json.dumps({path: row}), file=sys.stderr)
    if args.per_page:
        for i, s in enumerate(samples):
            print(json.dumps({"page": i, "background": s.background, "color": s.color, "font": s.font,
                              "size": s.size, "lines": len(s.lines),
                              "cer": {path: cers[i] for path, cers in per_page.items()}}), file=sys.stderr)
    by_type = {row["type"]: row for row in figures["tokenizers"].values()}
    if "binary_text" in by_type and "vq_image" in by_type:
        figures["binary_beats_vq"] = by_type["binary_text"]["cer"] < by_type["vq_image"]["cer"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
