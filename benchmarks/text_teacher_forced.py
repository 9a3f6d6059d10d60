"""Does the text model know which letters to draw? Teacher-forced reading of real pages, with the right quoted
text and with another page's.

For each tuning scene (seed 950001, as benchmarks/tune_sampling.py --world text; never the reported scenes)
the page is encoded by the checkpoint's tokenizer and the model reads it teacher-forced: every window of
image tokens is predicted from the true tokens before it. Reported, per arm:

- ``acc``: the share of image tokens whose most likely id (the argmax) is the true one, on all tokens and on
  ``ink`` tokens (those whose 4x4-pixel cell of the page has any ink: glyph strokes, not blank card);
- ``nll_ink``: the mean negative log-likelihood of the true ink tokens (nats), and per font
  (``nll_ink_mono`` ...): in the monospaced font a letter's index in its line is its column, so if the
  bytes help there and not in the proportional fonts, finding the letter is the hard part, not reading it;
- ``nll_top``: the same on the ink tokens of each line's first row of windows (``top_cells``), where the
  image before them shows little of the letter being drawn;
- ``glyph_acc_line`` / ``glyph_acc_top`` (a model trained with ``ARConfig.glyph_head``): how often that
  head names the letter under a cell on a line, and under the cells of ``nll_top``, from the same states;
- ``cer``: OCR CER of the page decoded from the argmax ids (each window from the true context), against
  the page's text.

The arms differ only in the quoted bytes: ``matched`` gives the page's own text; ``swapped`` gives the text
of another page of the same batch, the rest of the prompt (card, colour, font, size, alignment) unchanged.
If the model reads the letters from the bytes, ``matched`` must beat ``swapped`` on ink tokens by a wide
margin; if the two are close, the glyphs come from the image context alone (a letter model of shapes), and
sampling cannot write the asked-for text however it is tuned. ``--guidance`` other than 1 mixes in the
unconditional branch as sampling does (constant scale); ``--uncond bytes`` drops only the quoted bytes there,
a guidance towards the text alone.

    .venv/bin/python benchmarks/text_teacher_forced.py --checkpoint checkpoints/text --n 8

Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.eval import text_eval  # noqa: E402
from mmgen.eval.text_run import eval_scenes  # noqa: E402
from mmgen.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from mmgen.text.quoted import split_prompts  # noqa: E402
from mmgen.tokenizers.vq_image import tensor_to_images  # noqa: E402
from mmgen.worlds import text as tw  # noqa: E402

TEXT_TUNING_SEED = 950_001  # benchmarks/tune_sampling.py's text tuning scenes


def top_cells(sample: tw.TextSample, cell: int, window: int) -> torch.Tensor:
    """(H/cell * W/cell,) bool, raster order: each line's cells (``text.glyph_map``) in the first row of
    Token-Shuffle windows that reaches the line (``text.line_rows``). Drawing them, the model has seen
    little of the letters there: the tops of the letters to the left (part of the same letter where it is
    wider than a window), nothing above; the quoted bytes (or a guess from the letters before) must name it."""
    g = tw.glyph_map(sample, cell)
    out = np.zeros_like(g, dtype=bool)
    for rows in tw.line_rows(sample, cell):
        first = rows[rows < rows[0] // window * window + window]      # the band's rows in its first window row
        out[first] = g[first] > 0
    return torch.from_numpy(out.reshape(-1))


def ink_cells(sample: tw.TextSample, cell: int) -> torch.Tensor:
    """(H/cell * W/cell,) bool, raster order: the token cells of the page holding any ink."""
    ink = text_eval._ink(np.asarray(sample.image.convert("RGB")), sample.background)
    h, w = ink.shape
    return torch.from_numpy(ink.reshape(h // cell, cell, w // cell, cell).any((1, 3)).reshape(-1))


@torch.no_grad()
def teacher_forced(pipe, samples: list, texts: list[str], guidance: float, uncond: str = "all"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-range logits (b, N, V) of the pages of ``samples`` read teacher-forced, the quoted text of each
    prompt replaced by ``texts``, the true local ids (b, N) and the conditional head states (b, N, d) that
    drew the logits (what a glyph head reads). With ``guidance`` other than 1, the
    unconditional branch drops ``all`` of the condition (as sampling does) or only the ``bytes`` (the rest
    of the prompt kept: a guidance towards the quoted text alone, a condition training never drops alone)."""
    model, vocab = pipe.model, pipe.model.vocab
    if any(f'"{s.text}"' not in s.caption for s in samples):
        raise ValueError("a scene's caption does not quote its text: the other text could not be put in its place")
    prompts = [s.caption.replace(f'"{s.text}"', f'"{t}"') for s, t in zip(samples, texts)]
    codes = pipe.tokenizer.encode([s.image for s in samples])                         # (b, N) local ids
    image_ids = vocab.to_unified("image", codes)
    rest, slot, empty = split_prompts(prompts, vocab, model.config.text_bytes)
    boi = torch.full((len(samples), 1), vocab.special("<boi>"), dtype=torch.long)
    lo, hi = vocab.range("image")
    states = model.image_states(pipe.encode_prompts(rest), torch.cat([slot, boi], 1), image_ids)
    logits = model.logits(states)[..., lo:hi]
    if guidance != 1.0:
        if uncond not in ("all", "bytes"):
            raise ValueError(f"uncond must be 'all' or 'bytes', got {uncond!r}")
        null = model.prefix(None, None, batch=len(samples)) if uncond == "all" else pipe.encode_prompts(rest)
        free = model.image_logits(null, torch.cat([empty, boi], 1), image_ids)[..., lo:hi]
        logits = free + guidance * (logits - free)
    return logits, codes, states


def arm(pipe, samples, texts, guidance: float, batch: int, uncond: str = "all") -> dict:
    cell = pipe.tokenizer.config.image_size // pipe.tokenizer.layout.grid[1]
    hits, hits_ink, n_ink, nll_ink, images = 0, 0, 0, 0.0, []
    by_font = {}  # font -> [nll sum, ink tokens]
    window = pipe.model.config.shuffle_window
    nll_top, n_top = 0.0, 0
    glyph = {"line": [0, 0], "top": [0, 0]}  # glyph head (if the model has one): [right, cells]
    for i in range(0, len(samples), batch):
        chunk, chunk_texts = samples[i:i + batch], texts[i:i + batch]
        logits, codes, states = teacher_forced(pipe, chunk, chunk_texts, guidance, uncond)
        best = logits.argmax(-1)
        ink = torch.stack([ink_cells(s, cell) for s in chunk])
        right = best == codes
        hits += int(right.sum())
        hits_ink += int(right[ink].sum())
        n_ink += int(ink.sum())
        nll = -torch.log_softmax(logits, -1).gather(-1, codes[..., None])[..., 0]
        nll_ink += float(nll[ink].sum())
        top = torch.stack([top_cells(s, cell, window) for s in chunk]) & ink
        nll_top += float(nll[top].sum())
        n_top += int(top.sum())
        if pipe.model.config.glyph_head:
            letters = torch.stack([torch.from_numpy(tw.glyph_map(s, cell).reshape(-1)) for s in chunk]).long()
            read = pipe.model.glyph_head(states).argmax(-1) == letters
            for key, cells in (("line", letters > 0), ("top", top)):
                glyph[key][0] += int(read[cells].sum())
                glyph[key][1] += int(cells.sum())
        for s, row, row_ink in zip(chunk, nll, ink):
            acc_font = by_font.setdefault(s.font, [0.0, 0])
            acc_font[0] += float(row[row_ink].sum())
            acc_font[1] += int(row_ink.sum())
        images += tensor_to_images(pipe.tokenizer.decode(best))
    cers = [text_eval.cer(text_eval.ocr(im), s.text) for im, s in zip(images, samples)]
    return {"acc": hits / (len(samples) * codes.shape[1]), "acc_ink": hits_ink / max(n_ink, 1),
            "nll_ink": nll_ink / max(n_ink, 1), "nll_top": nll_top / max(n_top, 1), "cer": float(np.mean(cers)),
            **{f"nll_ink_{font}": total / max(count, 1) for font, (total, count) in sorted(by_font.items())},
            **({f"glyph_acc_{key}": right / max(n, 1) for key, (right, n) in glyph.items()}
               if pipe.model.config.glyph_head else {})}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/text")
    ap.add_argument("--n", type=int, default=8, help="short and long scenes each (default 8: 16 pages)")
    ap.add_argument("--quick", action="store_true", help="2 short and 2 long scenes (overrides --n)")
    ap.add_argument("--guidance", type=float, default=1.0, help="constant guidance scale (1: conditional only)")
    ap.add_argument("--uncond", choices=("all", "bytes"), default="all",
                    help="what the unconditional branch drops when --guidance is not 1: the whole condition "
                         "(as sampling does) or only the quoted bytes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--scenes-seed", type=int, default=TEXT_TUNING_SEED)
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 2
    if args.n < 1:
        ap.error("--n must be at least 1")
    t0 = time.time()
    torch.manual_seed(0)
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint)
    if not pipe.model.config.text_bytes:
        ap.error(f"{args.checkpoint} has no byte slot (architecture.text_bytes): it does not read quoted text")
    samples = eval_scenes(args.n, pipe.tokenizer.config.image_size, seed=args.scenes_seed)
    own = [s.text for s in samples]
    # another page's text, from the same half (short with short, long with long) so the line counts stay close
    half = len(samples) // 2 if len(samples) > args.n else len(samples)
    swapped = [own[(i + 1) % half + (i // half) * half] if half > 1 else own[i][::-1] for i in range(len(own))]
    res = {"checkpoint": args.checkpoint, "pages": len(samples), "guidance": args.guidance, "uncond": args.uncond}
    for name, texts in (("matched", own), ("swapped", swapped)):
        res[name] = {k: round(v, 4) for k, v in arm(pipe, samples, texts, args.guidance, args.batch, args.uncond).items()}
        print(name, json.dumps(res[name]), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
