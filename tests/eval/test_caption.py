"""Captioning judge: a caption is right when it names exactly the scene's objects and background."""
from __future__ import annotations

import random

from mmgen.eval.caption import caption_scenes, judge_caption
from mmgen.worlds import shapes


def test_judge_caption_accepts_any_order_and_wording():
    s = next(shapes.generate(1, seed=4, num_objects=3))
    assert judge_caption(s.canonical_caption, s.objects, s.background)["correct"]
    reordered = shapes.canonical_caption(list(reversed(s.objects)), s.background)
    assert judge_caption(reordered, s.objects, s.background)["correct"]
    para = shapes.paraphrase_caption(s.objects, s.background, random.Random(0))
    assert judge_caption(para, s.objects, s.background)["correct"]


def test_judge_caption_counts_wrong_attributes():
    s = next(shapes.generate(1, seed=5, num_objects=1))
    o = s.objects[0]
    other = next(c for c in shapes.COLORS if c != o.color)
    wrong = shapes.canonical_caption([shapes.ShapeObject(other, o.shape, o.size, o.cell)], s.background)
    j = judge_caption(wrong, s.objects, s.background)
    assert not j["correct"] and j["parsed"] and j["background"]
    assert (j["color"], j["shape"], j["size"], j["cell"]) == (0, 1, 1, 1)
    bg = next(b for b in shapes.BACKGROUNDS if b != s.background)
    assert not judge_caption(shapes.canonical_caption(s.objects, bg), s.objects, s.background)["correct"]
    missing = next(shapes.generate(1, seed=6, num_objects=2))
    one = shapes.canonical_caption(missing.objects[:1], missing.background)
    assert not judge_caption(one, missing.objects, missing.background)["correct"]
    garbage = judge_caption("\ufffd\ufffd zz", s.objects, s.background)
    assert not garbage["parsed"] and not garbage["correct"]


def test_caption_scenes_are_seeded_and_balanced():
    a, b = caption_scenes(4), caption_scenes(4)
    assert [s.canonical_caption for s in a] == [s.canonical_caption for s in b]
    assert [len(s.objects) for s in a] == [1] * 4 + [2] * 4 + [3] * 4


def test_judge_caption_counts_shape_by_true_size():
    for seed in range(7, 40):  # one scene with a small and a large object, one with two of a size
        s = next(shapes.generate(1, seed=seed, num_objects=2))
        a, b = s.objects
        other = next(sh for sh in shapes.SHAPES if sh != a.shape)
        wrong = shapes.canonical_caption([shapes.ShapeObject(a.color, other, a.size, a.cell), b], s.background)
        j = judge_caption(wrong, s.objects, s.background)
        assert j["shape"] == 1 and j["shape_small"] + j["shape_large"] == 1
        assert j[f"shape_{b.size}"] == 1  # b's shape is right, a's wrong
