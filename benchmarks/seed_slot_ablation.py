"""Why SEED's slot head names colour, size and position but not shape: one difference at a time.

The tokenizer's causal Q-Former and slot head (``CausalQFormer``, ``CaptionSlots``, the same classes and
optimiser settings as ``mmgen train seed-tokenizer``: AdamW betas (0.9, 0.98), lr 1e-3, warm-up 50, cosine,
batch 128) are trained from scratch on the slot loss over frozen CLIP tokens of a fixed image set (computed
once, so a step costs the Q-Former only), and scored on held-out one-object images. Variants:

- ``base``: every attribute, the training mix of one to three objects, gradient clipped to norm 1;
- ``no_clip``: no gradient clipping;
- ``pos_small``: the Q-Former's feature position embedding at 0.02 instead of unit scale;
- ``one_object``: one-object images only;
- ``shape_only`` / ``shape_only_one_object``: the shape slot's loss alone (the others weighted 0);
- ``shape_first``: the shape loss alone for the first third of the steps, then every attribute.

With ``--fresh-probe`` each trained Q-Former is then frozen and a new slot head is trained on its
embeddings of one-object images (``seed_fresh_slot_readout``'s recipe): is shape in the embeddings even where
the jointly trained head does not read it?

    .venv/bin/python benchmarks/seed_slot_ablation.py --clip runs/clip_p4/clip
    .venv/bin/python benchmarks/seed_slot_ablation.py --clip runs/clip_p4/clip --variants base one_object --fresh-probe

Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgen.eval.clip_probe import clip_tokens, slot_scores, train_slot_head  # noqa: E402
from mmgen.tokenizers.clip_shapes import ShapesCLIP  # noqa: E402
from mmgen.tokenizers.seed import CaptionSlots, CausalQFormer, SEEDConfig  # noqa: E402
from mmgen.train.common import cosine_lr  # noqa: E402
from mmgen.worlds import shapes  # noqa: E402

VARIANTS = {
    "base": {},
    "no_clip": {"clip": None},
    "pos_small": {"pos_scale": 0.02},
    "one_object": {"one_object": True},
    "shape_only": {"shape_only": True},
    "shape_only_one_object": {"shape_only": True, "one_object": True},
    "shape_first": {"shape_first": True},
}
SHAPE_ONLY = {"color": 0, "size": 0, "cell": 0, "background": 0}


def train_variant(name: str, feats: dict, cfg: SEEDConfig, steps: int, probe_steps: int) -> dict:
    opts = {"clip": 1.0, "pos_scale": 1.0, "one_object": False, "shape_only": False, "shape_first": False,
            **VARIANTS[name]}
    torch.manual_seed(0)
    qf, slots = CausalQFormer(cfg, feats["train"].shape[1]), CaptionSlots(cfg)
    with torch.no_grad():
        qf.feat_pos.mul_(opts["pos_scale"])
    if opts["shape_only"]:
        slots.set_weights(SHAPE_ONLY)
    params = [*qf.parameters(), *slots.parameters()]
    opt = torch.optim.AdamW(params, 1e-3, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    pool = feats["one_idx"] if opts["one_object"] else torch.arange(len(feats["train"]))
    curve, t0 = {}, time.time()
    for step in range(steps):
        if opts["shape_first"]:
            slots.set_weights(SHAPE_ONLY if step < steps // 3 else None)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 1e-3, 50)
        idx = pool[torch.randint(0, len(pool), (128,), generator=gen)]
        loss, _ = slots(qf(feats["train"][idx]), feats["train_t"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opts["clip"] is not None:
            torch.nn.utils.clip_grad_norm_(params, opts["clip"])
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            with torch.no_grad():
                curve[step + 1] = slot_scores(slots, qf(feats["test"]), feats["test_t"])["shape"]
            print(f"  {name}: step {step + 1}: shape {curve[step + 1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        out = {"shape_by_step": curve, "final": slot_scores(slots, qf(feats["test"]), feats["test_t"])}
    if probe_steps:
        out["fresh_probe_shape_by_step"] = fresh_head(qf, feats, cfg, probe_steps)
    return out


def fresh_head(qf: CausalQFormer, feats: dict, cfg: SEEDConfig, steps: int) -> dict:
    """A new slot head on the frozen Q-Former's embeddings of the one-object training images; shape by step."""
    qf.eval()
    with torch.no_grad():
        one = feats["one_idx"]
        e_train = torch.cat([qf(feats["train"][one[i:i + 500]]) for i in range(0, len(one), 500)])
        e_test = qf(feats["test"])
    curve = train_slot_head(cfg, e_train, feats["train_t"][one], e_test, feats["test_t"], steps)["shape_by_step"]
    print(f"  fresh head on the frozen embeddings: {curve}", flush=True)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", required=True, help="a trained CLIP folder (mmgen train clip)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-train", type=int, default=6000, help="training images (the one-to-three-object mix)")
    ap.add_argument("--fresh-probe", action="store_true", help="also train a new slot head on each frozen Q-Former")
    ap.add_argument("--probe-steps", type=int, default=600, help="the new slot head's steps (with --fresh-probe)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.steps < 1 or args.probe_steps < 1 or args.n_train < 128:
        ap.error("--steps and --probe-steps must be positive and --n-train at least one batch (128)")
    clip = ShapesCLIP.from_pretrained(args.clip).eval()
    train = list(itertools.islice(shapes.generate(None, seed=11, size=clip.image_size,
                                                  exclude_combos=shapes.HELD_OUT_COMBOS), args.n_train))
    test = list(shapes.generate(500, 920_004, size=clip.image_size, num_objects=1))
    cfg = SEEDConfig(image_size=clip.image_size, feature_dim=clip.feature_dim, clip_class_token=True)
    slots = CaptionSlots(cfg)
    feats = {"train": clip_tokens(clip, train), "test": clip_tokens(clip, test),
             "train_t": slots.targets([(s.objects, s.background) for s in train]),
             "test_t": slots.targets([(s.objects, s.background) for s in test]),
             "one_idx": torch.tensor([i for i, s in enumerate(train) if len(s.objects) == 1])}
    needs_one = args.fresh_probe or any(VARIANTS[v].get("one_object") for v in args.variants)
    if needs_one and len(feats["one_idx"]) == 0:
        ap.error("these variants need one-object images among the training images: raise --n-train")
    figures = {"clip": args.clip, "steps": args.steps, "n_train": args.n_train}
    for name in args.variants:
        figures[name] = train_variant(name, feats, cfg, args.steps, args.probe_steps if args.fresh_probe else 0)
        print(f"{name}:", json.dumps(figures[name]), flush=True)
    line = json.dumps(figures)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
