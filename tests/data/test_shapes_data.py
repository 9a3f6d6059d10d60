import json

import numpy as np
from PIL import Image

from mmgen.data.shapes_data import folder_batches, world_batches


def test_world_batches_are_seeded_per_rank():
    a, cap_a = next(world_batches(4, seed=1, rank=0))
    b, cap_b = next(world_batches(4, seed=1, rank=0))
    c, _ = next(world_batches(4, seed=1, rank=1))
    assert a.shape == (4, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    assert cap_a == cap_b and not np.array_equal(a.numpy(), c.numpy())


def test_user_folder_with_captions(tmp_path):
    rows = []
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    images, captions = next(folder_batches(str(tmp_path), 2, seed=0, size=16))
    assert images.shape == (2, 3, 16, 16)
    assert all(c.startswith("picture ") for c in captions)
