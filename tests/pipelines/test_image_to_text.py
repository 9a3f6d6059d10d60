"""Image -> text with the AR model that draws: the caption path (byte tokens after the image tokens)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmgen.data.shapes_data import world_batches
from mmgen.pipelines.image_to_text import ImageToTextPipeline
from mmgen.tokenizers.base import CheckpointError
from mmgen.train.ar import caption_sequences
from mmgen.worlds import shapes
from tests.conftest import make_debug_model
from tests.tokenizers.test_seed import debug_seed


def test_caption_sequences_targets_only_caption_bytes():
    tok_vocab = make_debug_model(16).vocab
    image_ids = tok_vocab.to_unified("image", torch.tensor([[1, 2, 3], [4, 5, 6]]))
    ids, target = caption_sequences(image_ids, ["ab", "abcd"], tok_vocab)
    eot, pad = tok_vocab.special("<eot>"), tok_vocab.special("<pad>")
    byte = lambda c: tok_vocab.to_unified("byte", torch.tensor([ord(c)])).item()  # noqa: E731
    assert ids.shape == target.shape == (2, 3 + 3 + 4)
    # row 1: <boi> 4 5 6 <eoi> <bot> a b c d (<eot> is only a target)
    assert target[1].tolist() == [-100] * 5 + [byte("a"), byte("b"), byte("c"), byte("d"), eot]
    assert target[0].tolist() == [-100] * 5 + [byte("a"), byte("b"), eot, -100, -100]
    assert ids[0, -2:].tolist() == [eot, pad] or ids[0, -1].item() == pad


def test_reading_order_caption_is_a_function_of_the_image():
    s = next(shapes.generate(1, seed=2, num_objects=3))
    a = shapes.reading_order_caption(s.objects, s.background)
    b = shapes.reading_order_caption(list(reversed(s.objects)), s.background)
    assert a == b and a.endswith(f"on a {s.background} background")


def test_overfit_captions_come_back_exactly():
    """A debug model trained on two (image, caption) pairs must write those captions, greedy, byte for byte."""
    torch.manual_seed(0)
    tok = debug_seed(with_decoder=False)
    model = make_debug_model(tok.vocab_size)
    x, _ = next(world_batches(2, seed=11))
    captions = ["a small red star on the left on a black background", "a large blue circle in the center on gray"]
    ids, target = caption_sequences(model.vocab.to_unified("image", tok.encode(x)), captions, model.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    empty = torch.zeros(2, 0, model.config.hidden_size)
    for _ in range(150):
        loss = F.cross_entropy(model(empty, ids).reshape(-1, model.vocab.size), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe = ImageToTextPipeline(tok, model.eval())
    out = pipe(x)
    assert out.captions == captions
    assert out.record["forward_passes"] == max(len(c) for c in captions) + 1  # up to and including <eot>
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert pipe(x, temperature=1.5, generator=g()).captions == pipe(x, temperature=1.5, generator=g()).captions
    assert len(pipe(x, max_bytes=5).captions[0]) == 5
    with pytest.raises(ValueError, match="max_bytes"):
        pipe(x, max_bytes=0)
    with pytest.raises(ValueError, match="at least one image"):
        pipe(torch.zeros(0, 3, 64, 64))
    with pytest.raises(CheckpointError, match="not trained to write captions"):
        ImageToTextPipeline(tok, model, tasks=["draw"])


def test_caption_defaults_survive_packing_and_reach_captioning(tmp_path, text_encoder):
    """A checkpoint's caption_defaults (beams, rerank) are kept by save_pretrained, read by both ways of making
    the captioning pipeline, and used when a call gives none; a call's own options win."""
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    torch.manual_seed(0)
    tok = debug_seed(with_decoder=False)
    model = make_debug_model(tok.vocab_size).eval()
    pipe = TextToImagePipeline(tok, model, text_encoder, tasks=["draw", "see"],
                               caption_defaults={"beams": 3, "rerank": 0.5}, judge=tok.clip, candidates=2)
    pipe.save_pretrained(tmp_path / "ckpt", dtype=None)
    # the judge is the tokenizer's own CLIP: named, not saved twice, and the same module once loaded
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert index["judge"] == {"path": "tokenizer/clip", "candidates": 2} and not (tmp_path / "ckpt" / "judge").exists()
    drawer = TextToImagePipeline.from_pretrained(tmp_path / "ckpt", text_encoder)
    assert drawer.judge is drawer.tokenizer.clip and drawer.candidates == 2
    loaded = ImageToTextPipeline.from_pretrained(tmp_path / "ckpt")
    shared = ImageToTextPipeline.from_text_to_image(TextToImagePipeline.from_pretrained(tmp_path / "ckpt",
                                                                                        text_encoder))
    assert loaded.defaults == shared.defaults == {"beams": 3, "rerank": 0.5, "mirror": False}
    x, _ = next(world_batches(2, seed=5))
    out = shared(x, max_bytes=6)
    assert out.record["sampler"] == "ar-text-beam3-rerank0.5"
    assert shared(x, beams=1, max_bytes=6).record["sampler"] == "ar-text"
    assert shared(x, rerank=0, max_bytes=6).record["sampler"] == "ar-text-beam3"
    assert ImageToTextPipeline(tok, model).defaults == {"beams": 1, "rerank": 0.0, "mirror": False}  # greedy
    with pytest.raises(ValueError, match="mirror-symmetric"):  # this debug checkpoint names no world
        shared(x, mirror=True)
