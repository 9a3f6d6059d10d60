"""``ARConfig.glyph_head``: a training-only head reads, from the state that draws each image token, the letter
drawn over its cell. Its loss is the cross-entropy over the cells on a line; the image loss is unchanged; runs
need the text world's layouts and may add the head to a trained model with --init."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmgen.model.transformer import AR_CONFIGS, GLYPH_CLASSES, ARConfig, MMGenTransformer
from mmgen.model.vocab import Vocabulary


def _model(glyph_head: bool, seed: int = 0) -> MMGenTransformer:
    torch.manual_seed(seed)
    cfg = ARConfig(**{**AR_CONFIGS["debug"].__dict__, "vocab": Vocabulary.build({"image": 64}).to_dict(),
                      "text_bytes": 16, "glyph_head": glyph_head, "shuffle_window": 2, "shuffle_grid": (4, 4)})
    return MMGenTransformer(cfg)


def test_glyph_loss_is_the_cross_entropy_of_the_cells_on_a_line():
    model = _model(True)
    lo, hi = model.vocab.range("image")
    g = torch.Generator().manual_seed(0)
    image = torch.randint(lo, hi, (2, 16), generator=g)
    start = torch.full((2, 1), model.vocab.special("<boi>"))
    prefix = model.prefix(torch.randn(2, 5, 384, generator=g), torch.ones(2, 5, dtype=torch.bool))
    glyphs = torch.zeros(2, 4, 4, dtype=torch.uint8)
    glyphs[0, 1] = torch.tensor([72, 105, 32, 33], dtype=torch.uint8)   # "Hi !" on one row of one page
    glyphs[1, 2, :2] = 65
    image_loss, glyph_loss = model(prefix, start, image_ids=image, target=image, glyph_target=glyphs)
    assert torch.allclose(image_loss, model(prefix, start, image_ids=image, target=image))  # unchanged
    states = model.image_states(prefix, start, image)
    on = glyphs.reshape(-1) > 0
    want = F.cross_entropy(model.glyph_head(states.reshape(-1, states.shape[-1])[on]), glyphs.reshape(-1)[on].long())
    assert torch.allclose(glyph_loss, want) and model.glyph_head.out_features == GLYPH_CLASSES
    glyph_loss.backward()  # the letters train the trunk that draws, not only the head
    assert model.glyph_head.weight.grad.abs().sum() > 0
    assert model.llama.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None
    with pytest.raises(ValueError, match="glyph_head"):
        _model(False)(prefix, start, image_ids=image, target=image, glyph_target=glyphs)
    with pytest.raises(ValueError, match="text_bytes"):
        MMGenTransformer(ARConfig(**{**AR_CONFIGS["debug"].__dict__, "glyph_head": True,
                                     "vocab": Vocabulary.build({"image": 64}).to_dict()}))


def _recipe(tmp_path, name: str, arch: dict, **training) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "architecture": {"size": "debug", "shuffle_window": 2, "text_bytes": 256, "max_positions": 512, **arch},
        "training": {"world": "text", "steps": 2, "batch_size": 2, "warmup": 1, "log_every": 1, **training}}))
    return str(path)


def test_a_text_run_trains_it_and_init_may_add_it(tmp_path):
    from safetensors.torch import load_file

    from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextTokenizer
    from mmgen.train.ar import train_ar

    torch.manual_seed(0)
    BinaryTextTokenizer(BINARY_TEXT_CONFIGS["debug"]).eval().save_pretrained(tmp_path / "tok")
    tok = str(tmp_path / "tok")
    plain = train_ar(_recipe(tmp_path, "plain", {}), tok, str(tmp_path / "plain"), progress=False)
    out = train_ar(_recipe(tmp_path, "glyph", {"glyph_head": True}, glyph_weight=0.5, lr=0.0), tok,
                   str(tmp_path / "glyph"), progress=False, init=str(plain))
    rows = [json.loads(line) for line in (tmp_path / "glyph" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["glyph_loss"] > 0 for r in rows)
    for r in rows:  # loss stays the image loss, comparable with runs without the head
        assert abs(r["total_loss"] - (r["loss"] + 0.5 * r["glyph_loss"])) < 1e-4
    train_ar(_recipe(tmp_path, "dropped", {"glyph_head": True}, glyph_weight=0.5, cond_dropout=1.0, steps=1), tok,
             str(tmp_path / "dropped"), progress=False)
    dropped = json.loads((tmp_path / "dropped" / "metrics.jsonl").read_text().splitlines()[0])
    assert dropped["glyph_loss"] == 0.0  # no letter is asked where no byte names it
    src, got = (load_file(str(p / "model" / "model.safetensors")) for p in (plain, out))
    assert set(got) - set(src) == {"glyph_head.weight", "glyph_head.bias"}
    assert all(torch.equal(src[k], got[k]) for k in src)  # lr 0: the trained weights, the head added fresh
    for arch, training, says in (({}, {"glyph_weight": 0.5}, "glyph_head: true"),
                                 ({"glyph_head": True}, {}, "glyph_weight above 0"),
                                 ({"glyph_head": True}, {"glyph_weight": 0.5, "cache_images": 4}, "rendered each"),
                                 ({"glyph_head": True, "shuffle_window": 1}, {"glyph_weight": 0.5}, "Token-Shuffle")):
        with pytest.raises(ValueError, match=says):
            train_ar(_recipe(tmp_path, "bad", arch, **training), tok, str(tmp_path / "bad"), progress=False)
    with pytest.raises(ValueError, match="glyph_head"):  # a trained head is not dropped silently
        train_ar(_recipe(tmp_path, "back", {}), tok, str(tmp_path / "back"), progress=False, init=str(out))
