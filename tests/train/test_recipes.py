"""The shipped recipes are valid: known sections and keys, and a model or tokenizer builds from each; a misspelt
key is an error, not a silently ignored setting."""
from pathlib import Path

import pytest
import torch
import yaml

from mmgen.tokenizers.base import TokenLayout
from mmgen.train.ar import AR_RECIPE_SECTIONS, build_model, train_ar
from mmgen.train.common import check_sections
from mmgen.train.tokenizer import TOKENIZER_RECIPE_SECTIONS, build_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


class _Grid:
    """What build_model reads from a tokenizer: its vocabulary size and token layout."""

    def __init__(self, vocab_size: int, layout: TokenLayout):
        self.vocab_size, self.layout = vocab_size, layout


# each AR recipe with the tokenizer recipe it is trained over
AR_TOKENIZER = {"shapes_ar.yaml": "vq_image.yaml", "shapes_ar_ts2.yaml": "vq_image.yaml",
                "shapes_ar_ts2_more.yaml": "vq_image.yaml",
                "text_ar_ts4.yaml": "binary_text.yaml", "text_ar_512_ts4.yaml": "binary_text.yaml",
                "text_ar_ts4_gpu.yaml": "binary_text.yaml", "text_ar_ts4_gpu_byte_index.yaml": "binary_text.yaml",
                "text_ar_ts4_gpu_glyph.yaml": "binary_text.yaml",
                "text_ar_ts4_bitwise.yaml": "binary_text_pages.yaml",
                "seed_ar.yaml": "seed.yaml", "seed_p4_ar.yaml": "seed_p4_slots_long_stage2_long_probe.yaml",
                "seed_p4_ar_more.yaml": "seed_p4_slots_long_stage2_long_probe.yaml",
                "seed_p4_ar_more2.yaml": "seed_p4_slots_long_stage2_long_probe.yaml",
                "seed_p4_ar_stage2_more.yaml": "seed_p4_stage2_more.yaml",
                "seed_p4_ar_stage2_longer.yaml": "seed_p4_stage2_more.yaml",
                "seed_p4_ar_stage2_longer_ids.yaml": "seed_p4_stage2_longer.yaml",
                "seed_p4_ar_shipped_ids_more.yaml": "seed_p4_stage2_more.yaml",
                "seed_p4_ar_s6_ids_more.yaml": "seed_p4_stage2_longer.yaml",
                "seed_p4_ar_stage2_longer2_ids.yaml": "seed_p4_stage2_longer2.yaml",
                "seed_p4_ar_stage2_longer2_ids_more.yaml": "seed_p4_stage2_longer2.yaml",
                "seed_p4_ar_s9_ids_more.yaml": "seed_p4_stage2_longer2.yaml"}


def test_every_ar_recipe_names_its_tokenizer():
    assert sorted(AR_TOKENIZER) == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(AR_TOKENIZER))
def test_ar_recipes_are_valid_over_their_tokenizer(name, text_encoder):
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    recipe = yaml.safe_load((ROOT / "recipes" / name).read_text())
    check_sections(recipe, AR_RECIPE_SECTIONS, name)
    tok_recipe = yaml.safe_load((ROOT / "tokenizers" / AR_TOKENIZER[name]).read_text())
    if tok_recipe.get("type") == "seed":  # SEED: 32 one-dimensional ids (its CLIP is too big to build here)
        tok = _Grid(tok_recipe["codebook"]["codebook_size"], TokenLayout("causal1d", (32,)))
        model = build_model(recipe, tok)
        cfg = model.config
        assert cfg.max_cond_tokens + 1 + 32 + 1 <= cfg.max_positions
    else:  # the pipeline refuses a model whose positions cannot hold the prompt, byte slot and image
        tok = build_tokenizer(tok_recipe)
        if recipe["training"].get("image_size"):  # the tokenizer on the recipe's canvas
            tok = tok.at_image_size(recipe["training"]["image_size"])
        TextToImagePipeline(tok, build_model(recipe, tok), text_encoder)


GRID_TOKENIZER_RECIPES = [p for p in sorted((ROOT / "tokenizers").glob("*.yaml"))
                          if yaml.safe_load(p.read_text()).get("type", "vq_image") in ("vq_image", "binary_text")]


@pytest.mark.parametrize("path", GRID_TOKENIZER_RECIPES, ids=lambda p: p.name)
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


def test_a_second_stage_recipe_keeps_the_architecture_it_starts_from():
    """tokenizers/binary_text_stage2.yaml continues a binary_text.yaml run (--init): the same network."""
    first = yaml.safe_load((ROOT / "tokenizers" / "binary_text.yaml").read_text())
    for later in ("binary_text_stage2.yaml", "binary_text_stage3.yaml", "binary_text_stage3_gpu.yaml",
                  "binary_text_pages.yaml",
                  "binary_text_pages_lowent.yaml", "binary_text_pages_flat.yaml", "binary_text_decoder_pages.yaml",
                  "binary_text_decoder_anneal.yaml", "binary_text_decoder_flat.yaml"):
        second = yaml.safe_load((ROOT / "tokenizers" / later).read_text())
        assert first["type"] == second["type"] and first["architecture"] == second["architecture"], later


def test_the_byte_index_arm_differs_from_the_gpu_recipe_only_there():
    """The A/B (scripts/gpu_ab.sh) is only fair while the two recipes agree on everything else."""
    a, b = (yaml.safe_load((ROOT / "recipes" / n).read_text())
            for n in ("text_ar_ts4_gpu.yaml", "text_ar_ts4_gpu_byte_index.yaml"))
    assert b["architecture"].pop("byte_index") is True and "byte_index" not in a["architecture"]
    assert a == b


def test_the_glyph_arm_differs_from_its_control_only_by_the_glyph_head():
    a, b = (yaml.safe_load((ROOT / "recipes" / n).read_text())
            for n in ("text_ar_ts4_gpu_byte_index.yaml", "text_ar_ts4_gpu_glyph.yaml"))
    assert b["architecture"].pop("glyph_head") is True and b["training"].pop("glyph_weight") > 0
    assert a == b


def test_the_512_text_recipe_can_start_from_the_256_one():
    """recipes/text_ar_512_ts4.yaml is trained with --init from checkpoints/text, a text_ar_ts4_gpu.yaml run: the
    same weights."""
    from dataclasses import asdict

    from mmgen.train.ar import INIT_FREE_FIELDS

    tok = build_tokenizer(yaml.safe_load((ROOT / "tokenizers" / "binary_text.yaml").read_text()))
    r256, r512 = (yaml.safe_load((ROOT / "recipes" / n).read_text()) for n in ("text_ar_ts4_gpu.yaml",
                                                                              "text_ar_512_ts4.yaml"))
    a = asdict(build_model(r256, tok).config)
    b = asdict(build_model(r512, tok.at_image_size(r512["training"]["image_size"])).config)
    assert {k for k in a if a[k] != b[k]} == INIT_FREE_FIELDS


def test_clip_and_seed_recipes_build(tmp_path):
    """Every CLIP recipe builds its open_clip model and names valid hard-negative kinds; the SEED tokenizer recipe
    for the 4x4-patch CLIP builds over that CLIP with the class token among its Q-Former's features."""
    from mmgen.data.shapes_data import negative_kind_table
    from mmgen.train.seed import build_clip, build_seed

    clips = {}
    for path in sorted((ROOT / "tokenizers").glob("clip_shapes*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        negative_kind_table(recipe["training"].get("hard_negative_kinds"))
        clips[path.name] = build_clip(recipe)
    assert clips["clip_shapes_p4.yaml"].model_cfg["vision_cfg"]["patch_size"] == 4
    clips["clip_shapes_p4.yaml"].save_pretrained(tmp_path / "clip")
    seed_recipe = yaml.safe_load((ROOT / "tokenizers" / "seed_p4.yaml").read_text())
    tok = build_seed(seed_recipe, str(tmp_path / "clip"))
    assert tok.config.clip_class_token and tok.qformer.feat_pos.shape[0] == (64 // 4) ** 2 + 1
    tok.caption_slots.set_weights(seed_recipe["training"].get("slot_weights"))


def test_seed_crops_recipe_starts_as_the_shipped_tokenizer():
    """tokenizers/seed_p4_crops.yaml over the shipped CLIP, started from the shipped tokenizer (--init): the
    Q-Former reads the image and 2x2 crops (5 x 257 tokens) and, its crop gates shut, gives the shipped ids."""
    from mmgen.tokenizers.seed import SEEDTokenizer
    from mmgen.train.seed import build_seed, init_seed_tokenizer
    from mmgen.worlds import shapes

    shipped = ROOT / "checkpoints" / "seed" / "tokenizer"
    recipe = yaml.safe_load((ROOT / "tokenizers" / "seed_p4_crops.yaml").read_text())
    tok = build_seed(recipe, str(shipped / "clip")).eval()
    assert tok.config.clip_crops == 2 and tok.qformer.feat_pos.shape[0] == 5 * ((64 // 4) ** 2 + 1)
    ref = SEEDTokenizer.from_pretrained(shipped, with_decoder=False)
    if ref.config.clip_crops == 0:
        init_seed_tokenizer(tok, str(shipped))
        images = [s.image for s in shapes.generate(8, seed=11)]
        assert torch.equal(tok.encode(images), ref.encode(images))
    else:  # the shipped tokenizer is this recipe's result: the recipe describes its shapes exactly
        tok.load_state_dict({**tok.state_dict(), **{k: v.float() for k, v in ref._own_state().items()}})
        assert set(tok._own_state()) == set(ref._own_state())


def test_seed_codebook_grows_from_the_shipped_tokenizer():
    """tokenizers/seed_p4_stage2_codes4096.yaml started from the shipped tokenizer (--init): the trained codes stay
    the first 1,024 of 4,096, so an image whose nearest code is still a trained one gets the shipped id, and the
    rest pick a new code that splits a trained one's cell. A smaller codebook or another width is refused."""
    from mmgen.tokenizers.seed import SEEDTokenizer
    from mmgen.train.seed import build_seed, grown_codebook, init_seed_tokenizer
    from mmgen.worlds import shapes

    shipped = ROOT / "checkpoints" / "seed" / "tokenizer"
    ref = SEEDTokenizer.from_pretrained(shipped, with_decoder=False)
    if ref.config.codebook_size != 1024:
        pytest.skip("the shipped tokenizer is not the 1,024-code one this recipe grows")
    recipe = yaml.safe_load((ROOT / "tokenizers" / "seed_p4_stage2_codes4096.yaml").read_text())
    tok = build_seed(recipe, str(shipped / "clip")).eval()
    init_seed_tokenizer(tok, str(shipped))
    assert tok.quantizer.embedding.weight.shape == (4096, 32)
    assert torch.equal(tok.quantizer.embedding.weight[:1024], ref.quantizer.embedding.weight.float())
    images = [s.image for s in shapes.generate(8, seed=11)]
    ids, ref_ids = tok.encode(images), ref.encode(images)
    old = ids < 1024
    assert torch.equal(ids[old], ref_ids[old]) and old.any() and (~old).any()
    theirs = {"quantizer.embedding.weight": torch.zeros(8, 4), "quantizer.usage": torch.ones(8)}
    for shape in [(4, 4), (16, 8)]:
        with pytest.raises(ValueError, match="codebook"):
            grown_codebook(theirs, {"quantizer.embedding.weight": torch.zeros(shape)})
