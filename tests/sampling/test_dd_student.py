import numpy as np
import pytest
import torch

from mmgen.model.dd_student import DDStudent
from mmgen.pipelines.text_to_image import TextToImagePipeline
from mmgen.sampling.ar import SamplingOptions, sample_ar
from mmgen.sampling.distilled import split_mask, teacher_tokens
from mmgen.tokenizers.base import CheckpointError
from tests.conftest import make_debug_model, make_debug_tokenizer

PROMPT = "a large red circle at the top left on a black background"


@pytest.fixture(scope="module")
def dd_pipeline(text_encoder):
    tok = make_debug_tokenizer()
    model = make_debug_model(tok.vocab_size)
    student = DDStudent.from_teacher(model, tok.code_vectors()).eval()
    return TextToImagePipeline(tok, model, text_encoder, student=student)


@torch.no_grad()
def test_flow_map_teacher_with_one_hot_distributions_is_greedy_decoding(dd_pipeline):
    pipe = dd_pipeline
    prefix = pipe.encode_prompts([PROMPT, "a small blue star in the center on a white background"])
    null = pipe.model.prefix(None, None, batch=2)
    boi = torch.full((2, 1), pipe.model.vocab.special("<boi>"))
    n = pipe.tokenizer.layout.num_tokens
    opts = SamplingOptions(guidance_scale=2.0, top_k=1)
    rng = pipe.model.vocab.range("image")
    greedy, _ = sample_ar(pipe.model, prefix, null, boi, n, rng, opts, torch.Generator().manual_seed(0))
    noise = torch.randn(2, n, pipe.tokenizer.code_vectors().shape[1])
    ids, rec = teacher_tokens(pipe.model, prefix, null, boi, noise, rng, pipe.tokenizer.code_vectors(), opts)
    assert torch.equal(ids, greedy) and rec.forward_passes == n


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2])
def test_dd_runs_exactly_steps_student_passes_per_batch(dd_pipeline, steps):
    calls = []
    hook = dd_pipeline.student.register_forward_hook(lambda *a: calls.append(1))
    try:
        gens = [torch.Generator().manual_seed(s) for s in range(3)]
        out = dd_pipeline([PROMPT] * 3, sampler="dd", steps=steps, generator=gens)
    finally:
        hook.remove()
    assert len(calls) == steps and out.record["forward_passes"] == steps and out.record["sampler"] == f"dd{steps}"
    size = dd_pipeline.tokenizer.config.image_size
    assert len(out.images) == 3 and out.images[0].size == (size, size)
    again = dd_pipeline([PROMPT], sampler="dd", steps=steps, generator=[torch.Generator().manual_seed(1)])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(out.images[1]))  # batch == one prompt alone


def test_dd_bad_input(dd_pipeline, debug_pipeline):
    with pytest.raises(ValueError, match="1 or 2"):
        dd_pipeline(PROMPT, sampler="dd", steps=3)
    with pytest.raises(ValueError, match="sampler"):
        dd_pipeline(PROMPT, sampler="diffusion")
    with pytest.raises(ValueError, match="no Distilled Decoding student"):
        debug_pipeline(PROMPT, sampler="dd")


def test_student_save_load_and_mismatch_refused(dd_pipeline, text_encoder, tmp_path):
    dd_pipeline.save_pretrained(tmp_path / "ck", dtype=None)
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "ck", text_encoder=text_encoder)
    a = dd_pipeline(PROMPT, sampler="dd", generator=[torch.Generator().manual_seed(4)], output_type="pt").images
    b = loaded(PROMPT, sampler="dd", generator=[torch.Generator().manual_seed(4)], output_type="pt").images
    assert torch.allclose(a, b, atol=1e-5)
    retrained = make_debug_model(dd_pipeline.tokenizer.vocab_size, seed=3)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="other teacher weights"):
        TextToImagePipeline(dd_pipeline.tokenizer, retrained, text_encoder, student=dd_pipeline.student)
    other_tok = make_debug_tokenizer(seed=7)  # another codebook
    with pytest.raises(CheckpointError, match="codebook"):
        TextToImagePipeline(other_tok, dd_pipeline.model, text_encoder, student=dd_pipeline.student)
    bigger = make_debug_model(dd_pipeline.tokenizer.vocab_size + 8)
    with pytest.raises(CheckpointError, match="codebook"):
        DDStudent.from_teacher(bigger, dd_pipeline.tokenizer.code_vectors())
    foreign = DDStudent.from_teacher(bigger, torch.randn(dd_pipeline.tokenizer.vocab_size + 8, 8))
    with pytest.raises(CheckpointError, match="vocabulary"):
        foreign.check_matches(dd_pipeline.model, dd_pipeline.tokenizer.code_vectors())


def test_split_mask_follows_sequence_order():
    from tests.model.test_token_shuffle import _shuffled_model

    plain = make_debug_model(64)
    m = split_mask(plain, 2, 16, 5)
    assert m.shape == (2, 16) and m[0, :5].all() and not m[0, 5:].any()
    shuffled = _shuffled_model(2)  # 8x8 grid, 2x2 windows
    m = split_mask(shuffled, 1, 64, 1)[0].view(8, 8)
    assert m[:2, :2].all() and m.sum() == 4                          # the first window is the top-left 2x2
