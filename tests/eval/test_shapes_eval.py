"""shapes-eval: ceiling on the world's own renders, caption parsing, robustness and must-fail cases."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mmgen.eval import shapes_eval as se
from mmgen.worlds import shapes as world
from mmgen.worlds.shapes import ShapeObject

SEED = 1234


def _attrs(objects) -> list[tuple[str, str, str, int]]:
    return sorted((o.color, o.shape, o.size, o.cell) for o in objects)


def _degrade(image: Image.Image, sigma: float = 0.6, quality: int = 90) -> Image.Image:
    """What an imperfect generator might give: a small Gaussian blur, then JPEG."""
    blurred = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), (sigma, sigma, 0))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(blurred), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _replace(objects: list[ShapeObject], i: int, **changes) -> list[ShapeObject]:
    o = objects[i]
    new = ShapeObject(changes.get("color", o.color), changes.get("shape", o.shape), changes.get("size", o.size),
                      changes.get("cell", o.cell), changes.get("center", o.center))
    return [new if j == i else x for j, x in enumerate(objects)]


def _perturbations(sample: world.ShapesSample, rng: random.Random, size: int) -> list[tuple[str, Image.Image]]:
    """Renders that differ from the sample's scene in exactly one way the judge must notice."""
    objs, bg = sample.objects, sample.background
    i = rng.randrange(len(objs))
    o = objs[i]
    free = [c for c in range(9) if c not in {x.cell for x in objs}]
    moved = world.place([ShapeObject(o.color, o.shape, o.size, rng.choice(free))], size, rng)[0]
    other_size = "small" if o.size == "large" else "large"
    out = [
        ("removed", world.render([x for j, x in enumerate(objs) if j != i], bg, size)),
        ("recoloured", world.render(_replace(objs, i, color=rng.choice([c for c in se.COLORS if c != o.color])),
                                    bg, size)),
        ("moved", world.render([moved if j == i else x for j, x in enumerate(objs)], bg, size)),
        ("resized", world.render(_replace(objs, i, size=other_size), bg, size)),
        ("background", world.render(objs, next(b for b in world.BACKGROUNDS if b != bg), size)),
    ]
    out += [(f"shape->{s}", world.render(_replace(objs, i, shape=s), bg, size)) for s in se.SHAPES if s != o.shape]
    return out


# ------------------------------------------------------------------------------------------------ ceiling

def test_ceiling_64():
    result = se.ceiling(n=100, seed=SEED, size=64)
    assert result["n"] == 100
    assert sum(result["n_by_objects"].values()) == 100
    assert result["score"] >= 0.97, result


def test_ceiling_128():
    assert se.ceiling(n=24, seed=SEED, size=128)["score"] >= 0.97


@pytest.mark.parametrize("captions", ["canonical", "held_out"])
def test_ceiling_through_parsed_captions(captions):
    assert se.ceiling(n=30, seed=SEED + 1, captions=captions)["score"] >= 0.97


def test_score_by_object_count():
    samples = list(world.generate(6, SEED, num_objects=2))
    result = se.score([s.image for s in samples], [(s.objects, s.background) for s in samples])
    assert result["n"] == 6 and result["n_by_objects"] == {"1": 0, "2": 6, "3": 0}
    assert result["by_objects"]["1"] is None and result["by_objects"]["2"] == result["score"] == 1.0


# ----------------------------------------------------------------------------------------------- analysis

def test_analyze_recovers_attributes_and_geometry():
    for sample in world.generate(20, SEED + 2, size=64):
        background, regions = se.analyze(np.asarray(sample.image))
        assert background == sample.background
        assert _attrs(regions) == _attrs(sample.objects)
        assert all(r.iou >= 0.8 for r in regions)
        for r in regions:
            truth = next(o for o in sample.objects if o.cell == r.cell)
            assert abs(r.center[0] - truth.center[0]) <= 1.0 and abs(r.center[1] - truth.center[1]) <= 1.0


def test_small_shapes_are_told_apart():
    """Each shape, small, on each background, alone in every cell it can be asked in."""
    for background in world.BACKGROUNDS:
        for k, shape in enumerate(se.SHAPES):
            color = list(se.COLORS)[(k + len(background)) % len(se.COLORS)]
            objs = world.place([ShapeObject(color, shape, "small", 3 * (k % 3) + k // 3)], 64, random.Random(k))
            verdict = se.judge(world.render(objs, background), objs, background)
            assert verdict["satisfied"], (shape, background, verdict["reason"])


def test_judge_accepts_dict_objects():
    sample = next(world.generate(1, SEED, num_objects=2))
    specs = [{"color": o.color, "shape": o.shape, "size": o.size, "cell": o.cell} for o in sample.objects]
    verdict = se.judge(sample.image, specs, sample.background)
    assert verdict["satisfied"] and verdict["reason"] == ""
    assert len(verdict["regions"]) == 2


def test_noise_is_ignored():
    rng = np.random.default_rng(0)
    palette = np.array(list(se.COLORS.values()), dtype=np.uint8)
    for sample in world.generate(20, SEED + 3):
        pixels = np.array(sample.image)
        specks = rng.random(pixels.shape[:2]) < 0.01  # isolated palette-coloured pixels
        pixels[specks] = palette[rng.integers(0, len(palette), int(specks.sum()))]
        assert se.judge(pixels, sample.objects, sample.background)["satisfied"]


def test_garbage_and_empty_images_fail():
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    background, regions = se.analyze(noise)
    assert background is None and regions == []
    wanted = [ShapeObject("red", "star", "small", 0)]
    assert not se.judge(noise, wanted, "black")["satisfied"]
    verdict = se.judge(Image.new("RGB", (64, 64)), wanted, "black")
    assert not verdict["satisfied"] and "missing" in verdict["reason"]


def test_non_square_image_rejected():
    with pytest.raises(ValueError):
        se.analyze(np.zeros((32, 64, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------- robustness

def test_degraded_renders_pass():
    samples = list(world.generate(60, SEED + 4, size=64))
    result = se.score([_degrade(s.image) for s in samples], [(s.objects, s.background) for s in samples])
    assert result["score"] >= 0.9, result


@pytest.mark.parametrize("degrade", [False, True], ids=["clean", "degraded"])
def test_perturbed_renders_fail(degrade):
    rng = random.Random(SEED)
    for sample in world.generate(12, SEED + 5, size=64):
        for kind, image in _perturbations(sample, rng, 64):
            if degrade:
                image = _degrade(image)
            verdict = se.judge(image, sample.objects, sample.background)
            assert not verdict["satisfied"], (kind, sample.caption)
            assert verdict["reason"]


def test_error_kinds_name_what_was_changed():
    """Each one-change perturbation is reported as that change, and scores tally the kinds."""
    expected = {"removed": ["object_missing"], "recoloured": ["color"], "moved": ["cell"], "resized": ["size"],
                "background": ["background"]}
    rng = random.Random(SEED)
    seen = 0
    for sample in world.generate(8, SEED + 6, size=64):
        for kind, image in _perturbations(sample, rng, 64):
            verdict = se.judge(image, sample.objects, sample.background)
            assert verdict["errors"] == expected.get(kind, ["shape"]), (kind, sample.caption, verdict["reason"])
            seen += 1
    assert seen > 40
    sample = next(world.generate(1, SEED + 7, num_objects=1))
    extra = world.render(world.place(list(sample.objects) + [ShapeObject(
        "red" if sample.objects[0].color != "red" else "blue", "circle", "small",
        (sample.objects[0].cell + 4) % 9)], 64, random.Random(0)), sample.background)
    result = se.score([sample.image, extra], [(sample.objects, sample.background)] * 2)
    assert result["errors"]["object_extra"] == 1 and sum(result["errors"].values()) == 1
    assert se.judge(sample.image, sample.objects, sample.background)["errors"] == []


# ---------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("style", ["canonical", "paraphrase", "held_out"])
def test_parse_prompt_round_trip(style):
    samples = world.generate(300, SEED + 6, size=8, paraphrase=style == "paraphrase",
                             held_out=style == "held_out")
    for sample in samples:
        objects, background = se.parse_prompt(sample.caption)
        assert background == sample.background, sample.caption
        assert _attrs(objects) == _attrs(sample.objects), sample.caption


def test_parse_prompt_examples():
    objects, background = se.parse_prompt(
        "A tiny red plus sign in the upper left;  a huge blue rhombus right in the middle over a grey backdrop.")
    assert background == "gray"
    assert _attrs(objects) == [("blue", "diamond", "large", 4), ("red", "cross", "small", 0)]
    objects, background = se.parse_prompt("a miniature cyan box along the bottom edge set on plain white")
    assert background == "white" and _attrs(objects) == [("cyan", "square", "small", 7)]


@pytest.mark.parametrize("prompt", [
    "",
    "a red circle at the top left on a black background",                  # no size
    "a small red circle at the top left",                                   # no background
    "a small red circle at the top left on a purple background",            # not a background colour
    "a small magenta circle at the top left on black",                      # not a palette colour
    "a small red hexagon at the top left on black",                         # not a shape
    "a small red circle somewhere on black",                                # no location
    "a small red circle at the top left and a dog on a black background",   # unknown object
    "a small red circle at the top left and a large blue box in the upper left on black",  # one cell, two
    "a small red circle at the top left on black on white",                 # two backgrounds
])
def test_parse_prompt_rejects(prompt):
    with pytest.raises(ValueError):
        se.parse_prompt(prompt)


def test_prompt_sets_hold_what_they_say():
    from mmgen.eval.shapes_run import PROMPT_SETS, eval_scenes

    held = set(world.HELD_OUT_COMBOS)
    sets = {name: eval_scenes(name, 6) for name in PROMPT_SETS}
    for name, scenes in sets.items():
        assert len(scenes) == 18 and [len(s.objects) for s in scenes] == [1] * 6 + [2] * 6 + [3] * 6, name
        canonical = [s.caption == world.canonical_caption(s.objects, s.background) for s in scenes]
        first_held = [(s.objects[0].color, s.objects[0].shape) in held for s in scenes]
        any_held = [any((o.color, o.shape) in held for o in s.objects) for s in scenes]
        if name == "canonical":
            assert all(canonical)
        elif name == "held_out_combos":
            assert all(canonical) and all(first_held)
        elif name == "paraphrase_held_out":
            assert not any(canonical) and all(first_held)
        else:  # held_out_wording
            assert not any(canonical) and not any(any_held)
    assert len({s.caption for scenes in sets.values() for s in scenes}) == 4 * 18  # four distinct sets
