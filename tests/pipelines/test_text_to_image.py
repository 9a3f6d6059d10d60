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
