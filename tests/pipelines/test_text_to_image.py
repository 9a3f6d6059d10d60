import json
import shutil

import numpy as np
import pytest
import torch

from mmgen.pipelines.text_to_image import TextToImagePipeline
from mmgen.tokenizers.base import CheckpointError
from tests.conftest import make_debug_model, make_debug_tokenizer

PROMPT = "a large red circle at the top left on a black background"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_generates_images_of_the_tokenizer_size(debug_pipeline):
    out = debug_pipeline([PROMPT, "a small blue star in the center on a white background"], num_images=2,
                         generator=_gen(0))
    assert len(out.images) == 4 and out.images[0].size == (16, 16)
    assert out.record["forward_passes"] == 16 and out.record["batch"] == 4
    assert out.prompts[:2] == [PROMPT, PROMPT]


def test_same_seed_same_image(debug_pipeline):
    a = debug_pipeline(PROMPT, generator=_gen(3)).images[0]
    b = debug_pipeline(PROMPT, generator=_gen(3)).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_save_load_same_output(debug_pipeline, debug_checkpoint, text_encoder):
    loaded = TextToImagePipeline.from_pretrained(debug_checkpoint, text_encoder=text_encoder)
    a = debug_pipeline(PROMPT, generator=_gen(4), output_type="pt").images
    b = loaded(PROMPT, generator=_gen(4), output_type="pt").images
    assert torch.allclose(a, b)
    index = json.loads((debug_checkpoint / "model_index.json").read_text())
    assert index["tokenizer"] == "tokenizer" and index["model"] == "model"


def test_bad_prompts_and_options(debug_pipeline):
    with pytest.raises(ValueError, match="empty"):
        debug_pipeline("   ")
    with pytest.raises(ValueError, match="too long"):
        debug_pipeline("a red circle " * 40)
    with pytest.raises(ValueError, match="num_images"):
        debug_pipeline(PROMPT, num_images=0)
    with pytest.raises(ValueError, match="at most"):
        debug_pipeline(PROMPT, num_images=1000)
    with pytest.raises(ValueError, match="temperature"):
        debug_pipeline(PROMPT, temperature=-1.0)
    with pytest.raises(ValueError, match="output_type"):
        debug_pipeline(PROMPT, output_type="jpeg")


def test_vocabulary_mismatch_is_refused(text_encoder):
    tok = make_debug_tokenizer()
    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        TextToImagePipeline(tok, make_debug_model(tok.vocab_size * 2), text_encoder)


def test_missing_and_corrupt_checkpoints(tmp_path, debug_checkpoint, text_encoder):
    with pytest.raises(CheckpointError, match="does not exist"):
        TextToImagePipeline.from_pretrained(tmp_path / "nothing", text_encoder=text_encoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        TextToImagePipeline.from_pretrained(tmp_path / "empty", text_encoder=text_encoder)
    broken = tmp_path / "broken"
    shutil.copytree(debug_checkpoint, broken)
    data = (broken / "model" / "model.safetensors").read_bytes()
    (broken / "model" / "model.safetensors").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(CheckpointError, match="corrupt"):
        TextToImagePipeline.from_pretrained(broken, text_encoder=text_encoder)


def test_checkpoint_loads_without_pickle(debug_checkpoint):
    files = sorted(p.name for p in debug_checkpoint.rglob("*") if p.is_file())
    assert all(not f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)
    assert files.count("model.safetensors") == 2


def test_checkpoint_defaults_are_what_options_give(text_encoder):
    """options() with no overrides is the checkpoint's defaults (distillation and pair signatures read it)."""
    tok = make_debug_tokenizer()
    defaults = {"guidance_scale": 2.5, "temperature": 0.7, "top_k": 5, "cfg_schedule": "linear"}
    pipe = TextToImagePipeline(tok, make_debug_model(tok.vocab_size), text_encoder, defaults)
    opts = pipe.options()
    assert (opts.guidance_scale, opts.temperature, opts.top_k, opts.top_p, opts.cfg_schedule) == (2.5, 0.7, 5, 1.0,
                                                                                                   "linear")
    assert pipe.options(top_k=0, temperature=None).top_k == 0 and pipe.options(temperature=None).temperature == 0.7
    for bad, match in (({"guidance": 3}, "unknown keys"), ({"top_k": "5"}, "top_k must be int"),
                       ({"temperature": -1}, "temperature")):
        with pytest.raises(CheckpointError, match=match):
            TextToImagePipeline(tok, make_debug_model(tok.vocab_size), text_encoder, bad)


def _debug_judge(size: int = 16, seed: int = 0):
    from mmgen.tokenizers.clip_shapes import CLIP_CONFIGS, ShapesCLIP

    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(CLIP_CONFIGS["debug"]))
    cfg["vision_cfg"].update(image_size=size, patch_size=8)
    return ShapesCLIP(cfg).eval()


@pytest.fixture(scope="module")
def judged_pipeline(text_encoder):
    tok = make_debug_tokenizer()
    return TextToImagePipeline(tok, make_debug_model(tok.vocab_size), text_encoder, judge=_debug_judge(),
                               candidates=3)


def test_candidates_keep_the_judges_best(judged_pipeline):
    """candidates=K returns, per image, the judge's best of the K images that K plain calls draw from the same
    generators in turn; its record holds those best scores."""
    prompts = [PROMPT, "a small blue star in the center on a white background"]
    out = judged_pipeline(prompts, num_images=2, generator=[_gen(s) for s in range(4)], candidates=4,
                          output_type="pt")
    gens = [_gen(s) for s in range(4)]
    draws = [judged_pipeline(prompts, num_images=2, generator=gens, candidates=1, output_type="pt").images
             for _ in range(4)]
    expanded = [p for p in prompts for _ in range(2)]
    scores = torch.stack([judged_pipeline.judge.clip_score(d, expanded) for d in draws], 1)
    best = scores.argmax(1)
    assert len(set(best.tolist())) > 1 or len(set(scores.argmin(1).tolist())) > 1  # the candidates differ
    want = torch.stack([draws[k][i] for i, k in enumerate(best.tolist())])
    assert torch.equal(out.images, want)
    plain = judged_pipeline(prompts, num_images=2, generator=[_gen(0)] * 4, candidates=1).record
    assert out.record["candidates"] == 4 and out.record["forward_passes"] == 4 * plain["forward_passes"]
    assert out.record["judge_scores"] == pytest.approx(scores.max(1).values.tolist(), abs=1e-4)


def test_one_candidate_is_the_plain_draw(judged_pipeline, debug_pipeline):
    a = judged_pipeline(PROMPT, generator=_gen(5), candidates=1, output_type="pt")
    b = debug_pipeline(PROMPT, generator=_gen(5), output_type="pt")
    assert torch.equal(a.images, b.images) and a.record["candidates"] == 1 and a.record["judge_scores"] is None
    default = judged_pipeline(PROMPT, generator=_gen(5), output_type="pt")  # the pipeline's default: 3
    assert default.record["candidates"] == 3


def test_bad_candidates_are_refused(judged_pipeline, debug_pipeline, text_encoder):
    for bad in (0, 65, 1.5, True, "2"):
        with pytest.raises(ValueError, match="candidates must be an integer"):
            judged_pipeline(PROMPT, candidates=bad)
    with pytest.raises(ValueError, match="needs a judge"):
        debug_pipeline(PROMPT, candidates=2)
    tok = make_debug_tokenizer()
    with pytest.raises(CheckpointError, match="judge CLIP takes 32px"):
        TextToImagePipeline(tok, make_debug_model(tok.vocab_size), text_encoder, judge=_debug_judge(32))
    with pytest.raises(CheckpointError, match="judge defaults"):
        TextToImagePipeline(tok, make_debug_model(tok.vocab_size), text_encoder, candidates=4)


def test_judge_is_saved_and_checked_on_load(judged_pipeline, tmp_path, text_encoder):
    path = tmp_path / "judged"
    judged_pipeline.save_pretrained(path, dtype=None)
    index = json.loads((path / "model_index.json").read_text())
    assert index["judge"] == {"path": "judge", "candidates": 3}
    loaded = TextToImagePipeline.from_pretrained(path, text_encoder=text_encoder)
    assert loaded.candidates == 3
    a = judged_pipeline(PROMPT, generator=_gen(6), output_type="pt").images
    assert torch.allclose(a, loaded(PROMPT, generator=_gen(6), output_type="pt").images)
    for entry, match in (({"path": "../elsewhere"}, "leaves the checkpoint"), ({"path": "missing"}, "holds no CLIP"),
                         ({"path": "model"}, "expected a 'open_clip_shapes'"),
                         ({"path": "judge", "k": 2}, "must be"), ("judge", "must be"),
                         ({"path": "judge", "candidates": 0}, "candidates must be")):
        (path / "model_index.json").write_text(json.dumps({**index, "judge": entry}))
        with pytest.raises(CheckpointError, match=match):
            TextToImagePipeline.from_pretrained(path, text_encoder=text_encoder)
