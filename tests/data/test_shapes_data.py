import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.data.shapes_data import folder_batches, training_batches, world_batches


def test_world_batches_are_seeded_per_rank():
    a, cap_a = next(world_batches(4, seed=1, rank=0))
    b, cap_b = next(world_batches(4, seed=1, rank=0))
    c, _ = next(world_batches(4, seed=1, rank=1))
    assert a.shape == (4, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    assert cap_a == cap_b and not np.array_equal(a.numpy(), c.numpy())


def test_world_batches_rendered_in_worker_processes():
    from mmgen.data.shapes_data import WORKER_RANK_STRIDE

    stream = training_batches("text", 2, seed=3, size=128, workers=2)
    batches = [next(stream) for _ in range(4)]
    # the workers take turns, each on its own stream: the in-process streams of ranks 100 and 200, exactly
    for w in (0, 1):
        own = training_batches("text", 2, seed=3, size=128, rank=WORKER_RANK_STRIDE * (w + 1))
        for x, captions in batches[w::2]:
            want_x, want_captions = next(own)
            assert x.dtype == torch.float32 and torch.equal(x, want_x) and captions == want_captions
    assert len({tuple(c) for _, c in batches}) == 4
    # with a device the same batches arrive there as uint8 (here the CPU: a GPU run's path, minus the pinning)
    on_device = training_batches("text", 2, seed=3, size=128, workers=2, device="cpu")
    assert all(torch.equal(next(on_device)[0].float() / 255.0, x) for x, _ in batches[:2])
    x, _ = next(training_batches("text", 2, seed=3, size=128, device="cpu"))
    assert x.dtype == torch.uint8
    assert torch.equal(x.float() / 255.0, next(training_batches("text", 2, seed=3, size=128))[0])
    # glyph maps travel with their pages, from the workers too (ARConfig.glyph_head)
    x, captions, glyphs = next(training_batches("text", 2, seed=3, size=128, workers=1, device="cpu", glyph_cell=4))
    _, want_captions, want = next(training_batches("text", 2, seed=3, size=128, rank=WORKER_RANK_STRIDE,
                                                   glyph_cell=4))
    assert captions == want_captions and glyphs.shape == (2, 32, 32) and torch.equal(glyphs, want)
    with pytest.raises(ValueError, match="shapes world writes no letters"):
        next(training_batches("shapes", 2, seed=3, size=64, glyph_cell=4))
    with pytest.raises(ValueError, match="workers"):
        training_batches("text", 2, seed=3, size=128, workers=-1)
    with pytest.raises(ValueError, match="unknown training world"):
        training_batches("moons", 2, seed=3, size=128, workers=2)


def test_user_folder_with_captions(tmp_path):
    rows = []
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    images, captions = next(folder_batches(str(tmp_path), 2, seed=0, size=16))
    assert images.shape == (2, 3, 16, 16)
    assert all(c.startswith("picture ") for c in captions)
    with pytest.raises(ValueError, match="fewer than one batch"):  # an endless loop before
        next(folder_batches(str(tmp_path), 8, seed=0, size=16))


def test_hard_negative_changes_exactly_one_attribute():
    import random

    from mmgen.data.shapes_data import contrastive_batches, perturb_scene
    from mmgen.eval.shapes_eval import parse_prompt
    from mmgen.worlds import shapes

    rng = random.Random(0)
    for s in shapes.generate(60, seed=8):
        neg = perturb_scene(s.objects, s.background, rng)
        diffs = [(a.color != b.color) + (a.shape != b.shape) + (a.size != b.size) + (a.cell != b.cell)
                 for a, b in zip(s.objects, neg)]
        assert sorted(diffs) == [0] * (len(diffs) - 1) + [1]
        assert len({o.cell for o in neg}) == len(neg)
    x, captions, negatives, described, scenes = next(contrastive_batches(8, seed=1))
    assert x.shape == (8, 3, 64, 64) and len(captions) == len(negatives) == 8
    for c, n in zip(captions, negatives):
        a, b = parse_prompt(c), parse_prompt(n)
        assert a[1] == b[1] and len(a[0]) == len(b[0])
        key = lambda objs: sorted((o.color, o.shape, o.size, o.cell) for o in objs)  # noqa: E731
        assert key(a[0]) != key(b[0])


def test_hard_negative_kinds_weight_the_changed_attribute():
    import random

    import pytest

    from mmgen.data.shapes_data import contrastive_batches, negative_kind_table, perturb_scene
    from mmgen.eval.shapes_eval import parse_prompt
    from mmgen.worlds import shapes

    assert negative_kind_table(None) == ("cell", "cell", "shape", "size", "color")
    assert negative_kind_table({"shape": 2, "size": 0}) == ("shape", "shape")
    rng = random.Random(0)
    for s in shapes.generate(40, seed=3):  # only shape ever changes when only shape is weighted
        neg = perturb_scene(s.objects, s.background, rng, negative_kind_table({"shape": 1}))
        assert [(a.color, a.size, a.cell) for a in s.objects] == [(b.color, b.size, b.cell) for b in neg]
        assert [a.shape for a in s.objects] != [b.shape for b in neg]
    _, captions, negatives, _, _ = next(contrastive_batches(8, seed=2, negative_kinds={"size": 1}))
    for c, n in zip(captions, negatives):
        a, b = parse_prompt(c)[0], parse_prompt(n)[0]
        assert sorted((o.color, o.shape, o.cell) for o in a) == sorted((o.color, o.shape, o.cell) for o in b)
        assert sorted((o.size, o.cell) for o in a) != sorted((o.size, o.cell) for o in b)
    for bad, msg in (({"angle": 1}, "unknown hard-negative kind"), ({"cell": 0}, "not all zero"),
                     ({"cell": 1.5}, "non-negative integers"), (["cell"], "must map kinds")):
        with pytest.raises(ValueError, match=msg):
            negative_kind_table(bad)
