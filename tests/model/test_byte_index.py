"""``ARConfig.byte_index``: each quoted byte gets a learnt embedding of its index in the text, whatever the
left padding of the slot; zero at the start, so it begins as the model without it; the fast sampling path
matches the reference forward; the see task (captions as bytes) is refused with it."""
import pytest
import torch
import yaml

from mmgen.model.transformer import AR_CONFIGS, ARConfig, MMGenTransformer
from mmgen.model.vocab import Vocabulary
from mmgen.text.quoted import byte_slot


def _model(byte_index: bool, seed: int = 0) -> MMGenTransformer:
    torch.manual_seed(seed)
    cfg = ARConfig(**{**AR_CONFIGS["debug"].__dict__, "vocab": Vocabulary.build({"image": 64}).to_dict(),
                      "text_bytes": 16, "byte_index": byte_index})
    return MMGenTransformer(cfg).eval()


def test_each_byte_gets_its_index_in_the_text_whatever_the_padding():
    model = _model(True)
    with torch.no_grad():
        model.byte_index_embed.weight.copy_(torch.randn_like(model.byte_index_embed.weight))
    slot = byte_slot(["Hi you", "a"], model.vocab, 16)  # left-padded: the texts start at different positions
    plain = model.llama.embed_tokens(slot) + model.modality_embed(1 + model.vocab.modality_of(slot))
    added = model.embed(slot) - plain
    for row, text in enumerate(["Hi you", "a"]):
        first = 16 + 2 - 1 - len(text)  # the slot ends with the text's bytes, then <eot>
        want = torch.zeros_like(added[row])
        want[first:first + len(text)] = model.byte_index_embed.weight[:len(text)]
        assert torch.allclose(added[row], want)


@torch.no_grad()
def test_starts_as_the_model_without_it_and_samples_as_it_trains():
    with_index, without = _model(True), _model(False)
    without.load_state_dict({k: v for k, v in with_index.state_dict().items() if not k.startswith("byte_index")})
    slot = byte_slot(["Hello there"], with_index.vocab, 16)
    boi = torch.full((1, 1), with_index.vocab.special("<boi>"))
    lo, hi = with_index.vocab.range("image")
    image = torch.randint(lo, hi, (1, 6), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([slot, boi, image], 1)
    prefix = with_index.prefix(torch.randn(1, 5, 384), torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(with_index(prefix, ids), without(prefix, ids), atol=1e-6)  # zero-initialised
    with_index.byte_index_embed.weight.normal_(0, 0.5)
    ref = with_index(prefix, ids)
    assert not torch.allclose(ref, without(prefix, ids), atol=1e-3)
    cache = with_index.new_cache(1, prefix.shape[1] + ids.shape[1])
    n = slot.shape[1] + 1
    assert torch.allclose(with_index.prefill(prefix, ids[:, :n], cache), ref[:, n - 1], atol=1e-5)
    for i in range(n, ids.shape[1]):
        assert torch.allclose(with_index.decode_step(ids[:, i], cache), ref[:, i], atol=1e-5)


def test_refused_without_a_byte_slot_and_with_the_see_task(tmp_path):
    from mmgen.pipelines.image_to_text import ImageToTextPipeline
    from mmgen.tokenizers.base import CheckpointError
    from tests.conftest import make_debug_tokenizer as tok

    with pytest.raises(CheckpointError, match="byte_index"):
        ImageToTextPipeline(tok(), _model(True), tasks=("draw", "see"))
    with pytest.raises(ValueError, match="text_bytes"):
        MMGenTransformer(ARConfig(**{**AR_CONFIGS["debug"].__dict__, "byte_index": True,
                                     "vocab": Vocabulary.build({"image": 64}).to_dict()}))
    from mmgen.train.ar import train_ar

    tok().save_pretrained(tmp_path / "tok")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"architecture": {"size": "debug", "text_bytes": 16, "byte_index": True},
                                      "training": {"steps": 1, "batch_size": 2, "see_batch": 2}}))
    with pytest.raises(ValueError, match="byte_index"):
        train_ar(str(recipe), str(tmp_path / "tok"), str(tmp_path / "run"), progress=False)
