import json

import pytest
import torch

from mmgen.model.transformer import MMGenTransformer
from mmgen.model.vocab import Vocabulary
from mmgen.tokenizers.base import CheckpointError
from tests.conftest import make_debug_model


def _inputs(model, b=3, t=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, 20, 384, generator=g)
    mask = torch.ones(b, 20, dtype=torch.bool)
    mask[0, 12:] = False
    lo, hi = model.vocab.range("image")
    ids = torch.randint(lo, hi, (b, t), generator=g)
    ids[:, 0] = model.vocab.special("<boi>")
    return model.prefix(states, mask), ids


@torch.no_grad()
def test_cached_decode_equals_uncached_forward():
    model = make_debug_model(64)
    prefix, ids = _inputs(model)
    ref = model(prefix, ids)  # transformers' LlamaModel forward, no cache
    cache = model.new_cache(3, prefix.shape[1] + ids.shape[1])
    logits = model.prefill(prefix, ids[:, :5], cache)
    assert torch.allclose(logits, ref[:, 4], atol=1e-5)
    for i in range(5, ids.shape[1]):
        logits = model.decode_step(ids[:, i], cache)
        assert torch.allclose(logits, ref[:, i], atol=1e-5)
    assert cache.length == prefix.shape[1] + ids.shape[1]


@torch.no_grad()
def test_chunked_prefill_after_cache_equals_uncached():
    model = make_debug_model(64)
    prefix, ids = _inputs(model)
    ref = model(prefix, ids)
    cache = model.new_cache(3, 100)
    model.prefill(prefix, ids[:, :4], cache)
    logits = model._run(model.embed(ids[:, 4:11]), cache)
    assert torch.allclose(logits, ref[:, 10], atol=1e-5)


@torch.no_grad()
def test_batch_equals_single():
    model = make_debug_model(64)
    prefix, ids = _inputs(model)
    full = model(prefix, ids)
    one = model(prefix[1:2], ids[1:2])
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_prefix_padding_and_dropout_use_null_prefix():
    model = make_debug_model(64)
    states, mask = torch.randn(2, 10, 384), torch.ones(2, 10, dtype=torch.bool)
    null = model.prefix(None, None, batch=2)
    dropped = model.prefix(states, mask, drop=torch.tensor([True, False]))
    assert torch.allclose(dropped[0], null[0])
    assert not torch.allclose(dropped[1, :10], null[1, :10])
    assert torch.allclose(dropped[1, 10:], null[1, 10:])  # padding positions are null
    with pytest.raises(ValueError, match="at most"):
        model.prefix(torch.randn(1, 60, 384), torch.ones(1, 60, dtype=torch.bool))


def test_save_load_same_logits_and_corruption(tmp_path):
    model = make_debug_model(64)
    prefix, ids = _inputs(model)
    model.save_pretrained(tmp_path / "m")
    loaded = MMGenTransformer.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(model(prefix, ids), loaded(prefix, ids))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        MMGenTransformer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="JSON"):
        MMGenTransformer.from_pretrained(tmp_path / "m")


def test_vocabulary_ranges():
    v = Vocabulary.build({"image": 100, "audio": 50})
    assert v.range("byte") == (16, 272) and v.range("image") == (272, 372) and v.range("audio") == (372, 422)
    assert v.size == 422
    ids = torch.tensor([0, 20, 300, 400])
    assert v.modality_of(ids).tolist() == [0, 1, 2, 3]
    assert v.to_local("image", v.to_unified("image", torch.tensor([0, 99]))).tolist() == [0, 99]
    with pytest.raises(ValueError):
        v.to_unified("image", torch.tensor([100]))
    assert v.to_unified("image", torch.tensor([5]), check=False).tolist() == [277]  # trusted ids: no read-back
    with pytest.raises(KeyError):
        v.range("video")
    assert Vocabulary.from_dict(v.to_dict()) == v
