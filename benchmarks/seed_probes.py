"""Where SEED loses an attribute: the CLIP, the Q-Former or the codebook. Diagnostics for a CLIP and
(optionally) a SEED tokenizer built on it, all on fresh one-object world images unless said otherwise:

- CLIP attribute retrieval: does the true caption outscore every caption with one attribute changed?
- CLIP shape readout: a small attention readout (the Q-Former's means) trained alone on the frozen CLIP's
  output tokens to name the shape, with and without a 3x3-convolution adapter (held-out accuracy by step).
- SEED slot readout: the tokenizer's own slot head on its continuous causal embeddings and on the embeddings
  reconstructed from the 32 ids, one and three objects.
- SEED fresh slot head: a new slot head trained on the tokenizer's frozen causal embeddings (one-object images,
  and the training mix of one to three objects): is the attribute in the embeddings, or has the tokenizer's
  own slot head not learnt to read it yet?
- SEED code probe: a small probe trained on the 32 ids alone.

    .venv/bin/python benchmarks/seed_probes.py --clip runs/clip_p4/clip --tokenizer runs/seed_p4/tokenizer
    .venv/bin/python benchmarks/seed_probes.py --clip runs/clip_p4/clip --quick   # fewer steps and images

Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgen.eval.clip_probe import (attribute_retrieval, clip_shape_readout, id_agreement,  # noqa: E402
                                   seed_code_probe, seed_fresh_slot_readout, seed_slot_readout)
from mmgen.tokenizers.clip_shapes import ShapesCLIP  # noqa: E402
from mmgen.tokenizers.seed import SEEDTokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", required=True, help="a trained CLIP folder (mmgen train clip)")
    ap.add_argument("--tokenizer", help="a SEED tokenizer folder built on that CLIP (mmgen train seed-tokenizer)")
    ap.add_argument("--quick", action="store_true", help="100 readout steps on 1,000 images, 100 probe images")
    ap.add_argument("--only-tokenizer", action="store_true", help="skip the CLIP probes (they do not depend on the "
                    "tokenizer)")
    ap.add_argument("--crops", type=int, default=0, metavar="N", help="also a shape readout on the tokens of the "
                    "image and its N x N upsampled crops (ShapesCLIP.crop_views), beside the image alone")
    ap.add_argument("--slots-only", action="store_true", help="of the tokenizer probes, only its own slot readout")
    ap.add_argument("--same-ids-as", metavar="DIR", help="also the share of the tokenizer's ids that this other SEED "
                    "tokenizer gives on the same scenes (e.g. the one it was continued from)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.manual_seed(0)
    clip = ShapesCLIP.from_pretrained(args.clip)
    n_train, steps, n = (1000, 100, 100) if args.quick else (3500, 400, 300)
    if args.only_tokenizer and not args.tokenizer:
        ap.error("--only-tokenizer needs --tokenizer")
    if args.same_ids_as and not args.tokenizer:
        ap.error("--same-ids-as needs --tokenizer")
    if args.slots_only and not args.tokenizer:
        ap.error("--slots-only needs --tokenizer")
    if not 0 <= args.crops <= 4:
        ap.error("--crops must be 0 to 4")
    figures = {"clip": args.clip}
    if not args.only_tokenizer:
        figures["clip_retrieval"] = attribute_retrieval(clip, n=n)
        print("CLIP attribute retrieval:", json.dumps(figures["clip_retrieval"]), flush=True)
        runs = [("clip_shape_readout", False, 0), ("clip_shape_readout_conv", True, 0)]
        if args.crops:
            runs.insert(1, (f"clip_shape_readout_crops{args.crops}", False, args.crops))
        for name, conv, crops in runs:
            figures[name] = clip_shape_readout(clip, n_train=n_train, n_test=500, steps=steps, conv=conv,
                                               progress=True, crops=crops)
            print(f"{name}:", json.dumps(figures[name]), flush=True)
    if args.tokenizer:
        tok = SEEDTokenizer.from_pretrained(args.tokenizer, with_decoder=False)
        if tok.clip.state_dict().keys() != clip.state_dict().keys() or any(
                not torch.equal(a, b.to(a.dtype)) for a, b in zip(tok.clip.state_dict().values(),
                                                                   clip.state_dict().values())):
            print(f"note: {args.tokenizer} carries a different CLIP than {args.clip}", flush=True)
        figures["tokenizer"] = args.tokenizer
        if args.same_ids_as:
            other = SEEDTokenizer.from_pretrained(args.same_ids_as, with_decoder=False)
            figures["same_ids"] = {"as": args.same_ids_as, **id_agreement(tok, other, n=n)}
            print("ids the same as", args.same_ids_as, json.dumps(figures["same_ids"]), flush=True)
        for k in (1, 3):
            figures[f"seed_slot_readout_{k}obj"] = seed_slot_readout(tok, n=n, num_objects=k)
            print(f"SEED slot readout, {k} object(s):", json.dumps(figures[f"seed_slot_readout_{k}obj"]), flush=True)
        fresh_steps = 100 if args.quick else 600
        for name, k in () if args.slots_only else (("seed_fresh_slots_1obj", 1), ("seed_fresh_slots_mix", None)):
            figures[name] = seed_fresh_slot_readout(tok, n_train=min(3000, n_train), steps=fresh_steps,
                                                    train_objects=k, progress=True)
            print(f"SEED fresh slot head, trained on {k or 'one to three'} object(s):", json.dumps(figures[name]),
                  flush=True)
        if not args.slots_only:
            figures["seed_code_probe"] = seed_code_probe(tok)
            print("SEED code probe:", json.dumps(figures["seed_code_probe"]), flush=True)
    line = json.dumps(figures)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
