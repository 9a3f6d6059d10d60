
import numpy as np
import pytest

from mmgen.worlds import shapes


def test_same_seed_same_samples():
    a = list(shapes.generate(5, seed=3, paraphrase=True))
    b = list(shapes.generate(5, seed=3, paraphrase=True))
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.caption for s in a] != [s.caption for s in shapes.generate(5, seed=4, paraphrase=True)]


def test_contract_attributes_and_canvas():
    for s in shapes.generate(200, seed=0):
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        assert 1 <= len(s.objects) <= 3
        assert len({o.cell for o in s.objects}) == len(s.objects)
        assert s.background in shapes.BACKGROUNDS
        for o in s.objects:
            cx, cy = shapes.cell_center(o.cell, 64)
            assert abs(o.center[0] - cx) <= 64 / 24 + 1e-9 and abs(o.center[1] - cy) <= 64 / 24 + 1e-9
        assert s.caption == s.canonical_caption


def test_canonical_caption_grammar():
    objs = [shapes.ShapeObject("red", "circle", "large", 0), shapes.ShapeObject("blue", "square", "small", 4)]
    assert shapes.canonical_caption(objs, "black") == (
        "a large red circle at the top left and a small blue square in the center on a black background")


def test_palette_and_background_pixels_exact():
    s = next(shapes.generate(1, seed=1, num_objects=1))
    arr = np.asarray(s.image)
    assert tuple(arr[0, 0]) == shapes.BACKGROUNDS[s.background] or s.objects[0].cell == 0
    o = s.objects[0]
    cx, cy = (int(round(v)) for v in o.center)
    if o.shape in ("circle", "square", "diamond", "cross"):  # the centre pixel is solid fill
        assert tuple(arr[cy, cx]) == shapes.COLORS[o.color]


def test_sizes_scale_with_canvas():
    s = next(shapes.generate(1, seed=2, size=128, num_objects=1))
    assert s.image.size == (128, 128)
    arr = np.asarray(s.image).astype(int)
    bg = np.array(shapes.BACKGROUNDS[s.background])
    ys, xs = np.nonzero(np.abs(arr - bg).sum(-1) > 60)
    side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    expected = shapes.SIZES[s.objects[0].size] * 128
    assert abs(side - expected) <= 3


def test_exclude_and_only_combos():
    for s in shapes.generate(300, seed=0, exclude_combos=shapes.HELD_OUT_COMBOS):
        assert all((o.color, o.shape) not in shapes.HELD_OUT_COMBOS for o in s.objects)
    for s in shapes.generate(30, seed=0, only_combos=shapes.HELD_OUT_COMBOS):
        assert (s.objects[0].color, s.objects[0].shape) in shapes.HELD_OUT_COMBOS


def test_held_out_wording_never_in_training_captions():
    held_words = {"miniature", "huge", "giant", "rhombus", "backdrop", "corner", "edge", "plain"}
    for s in shapes.generate(400, seed=5, paraphrase=True):
        assert not held_words & set(s.caption.replace(",", " ").replace(";", " ").split())


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_objects"):
        next(shapes.generate(1, seed=0, num_objects=4))
    with pytest.raises(ValueError, match="background"):
        shapes.render([], "green")
    with pytest.raises(ValueError, match="shape"):
        shapes.shape_polygons("hexagon", 0, 0, 1)


def test_mirror_caption_describes_the_mirrored_scene():
    """Every shape is symmetric about its vertical axis, so a scene mirrored left to right is the scene with each
    object in the other column: shapes-eval finds exactly the mirrored caption's objects in the mirrored image
    (what mirror test-time augmentation of captions relies on)."""
    from PIL import ImageOps

    from mmgen.eval.shapes_eval import judge, parse_prompt

    for s in shapes.generate(60, seed=31):
        mirrored = shapes.mirror_caption(s.canonical_caption)
        objects, background = parse_prompt(mirrored)
        assert judge(ImageOps.mirror(s.image), objects, background)["satisfied"], mirrored
        assert shapes.mirror_caption(mirrored) == shapes.reading_caption(s.canonical_caption)
    caption = "a small red star at the top left and a large blue circle on the right on a black background"
    assert shapes.mirror_caption(caption) == ("a small red star at the top right and a large blue circle on the "
                                              "left on a black background")  # reading order: top row first
    assert shapes.reading_caption(caption) == ("a small red star at the top left and a large blue circle on the "
                                               "right on a black background")
    assert shapes.mirror_caption("a red thing somewhere") is None and shapes.reading_caption("") is None
