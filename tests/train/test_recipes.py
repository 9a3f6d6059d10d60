"""The shipped recipes are valid: known sections and keys, and a model or tokenizer builds from each; a misspelt
key is an error, not a silently ignored setting."""
from pathlib import Path

import pytest
import yaml

from mmgen.model.transformer import MMGenTransformer
from mmgen.tokenizers.base import TokenLayout
from mmgen.train.ar import AR_RECIPE_SECTIONS, build_model, train_ar
from mmgen.train.common import check_sections
from mmgen.train.tokenizer import TOKENIZER_RECIPE_SECTIONS, build_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


class _Grid:
    """What build_model reads from a tokenizer: its vocabulary size and token layout."""

    def __init__(self, vocab_size: int, layout: TokenLayout):
        self.vocab_size, self.layout = vocab_size, layout


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_ar_recipes_are_valid(path):
    recipe = yaml.safe_load(path.read_text())
    check_sections(recipe, AR_RECIPE_SECTIONS, path.name)
    grid = TokenLayout("causal1d", (32,)) if "seed" in path.name else TokenLayout("grid2d", (16, 16))
    assert isinstance(build_model(recipe, _Grid(1024, grid)), MMGenTransformer)


@pytest.mark.parametrize("path", [p for p in sorted((ROOT / "tokenizers").glob("*.yaml"))
                                  if yaml.safe_load(p.read_text()).get("type", "vq_image") in ("vq_image", "binary_text")],
                         ids=lambda p: p.name)
def test_tokenizer_recipes_are_valid(path):
    recipe = yaml.safe_load(path.read_text())
    check_sections(recipe, TOKENIZER_RECIPE_SECTIONS, path.name)
    tok = build_tokenizer(recipe)
    crop = recipe["training"].get("crop")
    assert crop is None or crop % tok.config.downsample == 0


def test_a_misspelt_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"architecture": {"size": "debug"}, "training": {"cond_droput": 0.1}}))
    with pytest.raises(ValueError, match=r"unknown keys \['cond_droput'\] in section 'training'"):
        train_ar(str(bad), str(tmp_path / "tok"), str(tmp_path / "out"))
    bad.write_text(yaml.safe_dump({"type": "binary_text", "trainig": {"steps": 1}}))
    with pytest.raises(ValueError, match=r"unknown recipe sections \['trainig'\]"):
        train_tokenizer(str(bad), str(tmp_path / "out"))
    bad.write_text(yaml.safe_dump({"type": "binary_text", "data": "text"}))
    with pytest.raises(ValueError, match="must be a mapping"):
        train_tokenizer(str(bad), str(tmp_path / "out"))
