"""text-eval (WORLDS.md section 2): OCR with Tesseract, character error rate against the requested text,
and colour and alignment checks; the same OCR on the world's own renderings is the ceiling.

- OCR: Debian's ``tesseract`` binary (tesseract-ocr, English), page segmentation mode 6 (one block of text),
  run as a subprocess on a PNG; the image is upscaled to at least 512 pixels first (Tesseract reads glyphs of
  about 30 px best). Text is folded with ``normalize_text`` before comparing.
- CER: Levenshtein distance / length of the requested text (can exceed 1 when the OCR invents text).
- Colour: the palette colour nearest to the median of the stroke cores (the 30 % of ink pixels farthest
  from the background).
- Alignment: ink rows are split into lines; for each line its left edge, right edge and centre; the
  alignment whose edge varies least across lines (and, for one line, lies nearest its target) wins.
- Stray ink (a diagnostic reported beside the checks): the share of images with a band of ink too small to
  be a line of text, which the alignment check takes for one.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmgen.worlds import text as tw

OCR_MIN_SIDE = 512


def have_tesseract() -> bool:
    return shutil.which("tesseract") is not None


def ocr(image: Image.Image) -> str:
    if not have_tesseract():
        raise FileNotFoundError("tesseract is not installed (Debian: tesseract-ocr; make setup installs it)")
    img = image.convert("RGB")
    if min(img.size) < OCR_MIN_SIDE:
        scale = -(-OCR_MIN_SIDE // min(img.size))
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "page.png"
        img.save(path)
        res = subprocess.run(["tesseract", str(path), "stdout", "-l", "eng", "--psm", "6"],
                             capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"tesseract failed: {res.stderr.strip()[:300]}")
    return tw.normalize_text(res.stdout)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(hypothesis: str, reference: str) -> float:
    ref = tw.normalize_text(reference)
    if not ref:
        raise ValueError("the reference text is empty")
    return levenshtein(tw.normalize_text(hypothesis), ref) / len(ref)


def _ink(arr: np.ndarray, background: str) -> np.ndarray:
    bg = np.array(tw.BACKGROUNDS[background], dtype=float)
    return np.abs(arr.astype(float) - bg).sum(-1) > 30  # white on beige differs by 60


def text_color(image: Image.Image, background: str) -> str | None:
    arr = np.asarray(image.convert("RGB"))
    mask = _ink(arr, background)
    if mask.sum() < 5:
        return None
    # the core of the strokes: the ink pixels farthest from the background (anti-aliased edges are blends)
    bg = np.array(tw.BACKGROUNDS[background], dtype=float)
    ink = arr[mask].astype(float)
    dist = np.abs(ink - bg).sum(-1)
    med = np.median(ink[dist >= np.quantile(dist, 0.7)], axis=0)
    names = [c for c in tw.COLORS if tw.COLORS[c] != tw.BACKGROUNDS[background]]
    return min(names, key=lambda c: float(((np.array(tw.COLORS[c]) - med) ** 2).sum()))


def alignment(image: Image.Image, background: str) -> str | None:
    """The alignment that fits the ink best (None for a blank image)."""
    costs = alignment_costs(image, background)
    return min(costs, key=costs.get) if costs else None


def alignment_ok(image: Image.Image, background: str, align: str) -> bool:
    """The requested alignment fits within canvas/64 of the best one (a line as wide as the text box is left,
    centred and right aligned at once)."""
    costs = alignment_costs(image, background)
    return bool(costs) and costs[align] <= min(costs.values()) + image.width / 64


STRAY_INK_PIXELS = 20  # a band of ink rows with at most this many ink pixels is no line of text at any size


def ink_bands(image: Image.Image, background: str) -> list[tuple[int, int, int, int, int]]:
    """The image's ink split into bands of rows at blank rows, as the alignment check reads lines: (first row,
    last row, first column, last column + 1, ink pixels) for each band, top to bottom."""
    mask = _ink(np.asarray(image.convert("RGB")), background)
    rows = np.nonzero(mask.any(1))[0]
    if len(rows) == 0:
        return []
    bands, start = [], rows[0]
    for a, b in zip(rows[:-1], rows[1:]):
        if b - a > 1:
            bands.append((start, a))
            start = b
    bands.append((start, rows[-1]))
    out = []
    for r0, r1 in bands:
        cols = np.nonzero(mask[r0:r1 + 1].any(0))[0]
        out.append((int(r0), int(r1), int(cols[0]), int(cols[-1]) + 1, int(mask[r0:r1 + 1].sum())))
    return out


def stray_ink(image: Image.Image, background: str) -> bool:
    """A diagnostic, not a check of the prompt: does the image hold a band of ink too small to be a line of
    text (at most ``STRAY_INK_PIXELS`` pixels, e.g. a speck of one to three pixels on the blank card)? The
    alignment check takes each such band for a line, so one speck can fail it."""
    return any(band[4] <= STRAY_INK_PIXELS for band in ink_bands(image, background))


def alignment_costs(image: Image.Image, background: str) -> dict:
    canvas = image.width
    edges = [(b[2], b[3]) for b in ink_bands(image, background)]
    if not edges:
        return {}
    left = np.array([e[0] for e in edges], float)
    right = np.array([e[1] for e in edges], float)
    centre = (left + right) / 2
    margin = canvas // 16
    cost = {"left": np.abs(left - margin).mean() + left.std(),
            "right": np.abs(right - (canvas - margin)).mean() + right.std(),
            "center": np.abs(centre - canvas / 2).mean() + centre.std()}
    return {k: float(v) for k, v in cost.items()}


def judge(image: Image.Image, text: str, color: str, background: str, align: str) -> dict:
    read = ocr(image)
    return {"ocr": read, "cer": cer(read, text), "color_ok": text_color(image, background) == color,
            "align_ok": alignment_ok(image, background, align), "stray_ink": stray_ink(image, background)}


def summarize(results: list[dict], lines: list[int]) -> dict:
    def part(sel):
        rs = [r for r, keep in zip(results, sel) if keep]
        if not rs:
            return None
        return {"cer": float(np.mean([r["cer"] for r in rs])), "n": len(rs),
                "color": float(np.mean([r["color_ok"] for r in rs])),
                "alignment": float(np.mean([r["align_ok"] for r in rs])),
                "stray_ink": float(np.mean([r["stray_ink"] for r in rs]))}

    return {"all": part([True] * len(results)), "short": part([n <= 2 for n in lines]),
            "long": part([n >= 3 for n in lines])}


def ceiling(n: int = 40, seed: int = 900_101, canvas: int = 256) -> dict:
    """text-eval on the world's own renderings: the best any model can score with this OCR."""
    samples = list(tw.generate(n, seed=seed, canvas=canvas))
    results = [judge(s.image, s.text, s.color, s.background, s.align) for s in samples]
    return summarize(results, [len(s.lines) for s in samples])
