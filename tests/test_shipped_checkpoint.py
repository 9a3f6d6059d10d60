"""The checkpoint the project ships loads (safetensors only) and generates real 64x64 images quickly."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen.pipelines.text_to_image import DEFAULT_CHECKPOINT, TextToImagePipeline

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model_index.json").exists(),
                                reason="checkpoints/shapes not built")


@pytest.fixture(scope="module")
def pipe(text_encoder):
    return TextToImagePipeline.from_pretrained(DEFAULT_CHECKPOINT, text_encoder=text_encoder)


def test_weights_are_safetensors_and_small():
    files = [p for p in Path(DEFAULT_CHECKPOINT).rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    # 48 MB with the judge CLIP, a byte-identical copy of checkpoints/seed/tokenizer/clip (one blob in git)
    assert sum(p.stat().st_size for p in files) < 48 * 2**20
    assert (DEFAULT_CHECKPOINT / "README.md").is_file()
    judge = REPO_ROOT / "checkpoints" / "seed" / "tokenizer" / "clip"
    if judge.is_dir():
        for name in ("config.json", "model.safetensors"):
            assert (DEFAULT_CHECKPOINT / "judge" / name).read_bytes() == (judge / name).read_bytes()


def test_generates_deterministic_64px_images(pipe):
    prompt = "a large red circle at the top left on a black background"
    a = pipe(prompt, num_images=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], candidates=1)
    b = pipe(prompt, num_images=1, generator=[torch.Generator().manual_seed(0)], candidates=1)
    assert a.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.record["tokens"] == 256 and a.record["forward_passes"] == 256 // pipe.model.tokens_per_step
    c = pipe(prompt, num_images=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])  # the defaults
    d = pipe(prompt, num_images=1, generator=[torch.Generator().manual_seed(1)])
    assert pipe.candidates == 4 and c.record["candidates"] == 4
    assert np.array_equal(np.asarray(c.images[1]), np.asarray(d.images[0]))  # an image's seed alone decides it


def test_distilled_student_when_shipped(pipe):
    if pipe.student is None:
        pytest.skip("this checkpoint ships no Distilled Decoding student")
    prompt = "a small blue square in the center on a white background"
    for steps in (1, 2):
        out = pipe(prompt, num_images=2, sampler="dd", steps=steps, candidates=1,
                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
        assert out.record["forward_passes"] == steps and out.images[0].size == (64, 64)
        ranked = pipe(prompt, num_images=2, sampler="dd", steps=steps,
                      generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
        assert ranked.record["forward_passes"] == steps * pipe.candidates


def test_tokenizer_reconstructs_world_images(pipe):
    from mmgen.eval.shapes_run import evaluate_reconstruction

    res = evaluate_reconstruction(pipe.tokenizer, n=10)
    assert res["score"] >= 0.8 and res["psnr"] > 25


def test_the_readme_prompt_is_drawn_as_asked(pipe):
    """The README's example prompt passes shapes-eval's judge for the first seeds, with AR and with DD."""
    from mmgen.eval import shapes_eval

    prompt = "a large red circle at the top left on a black background"
    objects, background = shapes_eval.parse_prompt(prompt)
    samplers = [("ar", 1)] + ([("dd", 1)] if pipe.student is not None else [])
    for sampler, steps in samplers:
        out = pipe(prompt, num_images=4, sampler=sampler, steps=steps,
                   generator=[torch.Generator().manual_seed(s) for s in range(4)])
        verdicts = [shapes_eval.judge(img, objects, background)["satisfied"] for img in out.images]
        assert sum(verdicts) >= 3, (sampler, verdicts)
