"""Shared fixtures: debug-sized models (seconds on a CPU) and the real, frozen sentence encoder."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in mmgen may reach a model hub

from mmgen.model.transformer import AR_CONFIGS, MMGenTransformer
from mmgen.model.vocab import Vocabulary
from mmgen.text.encoder import SentenceEncoder
from mmgen.tokenizers.vq_image import VQ_IMAGE_CONFIGS, VQImageTokenizer


@pytest.fixture(scope="session")
def text_encoder():
    return SentenceEncoder(max_tokens=48)


def make_debug_model(image_vocab: int, seed: int = 0) -> MMGenTransformer:
    torch.manual_seed(seed)
    cfg = AR_CONFIGS["debug"]
    cfg = type(cfg)(**{**cfg.__dict__, "vocab": Vocabulary.build({"image": image_vocab}).to_dict()})
    model = MMGenTransformer(cfg).eval()
    with torch.no_grad():  # a fresh model has a zero modality embedding; make it matter in tests
        model.modality_embed.weight.normal_(0, 0.1)
    return model


def make_debug_tokenizer(seed: int = 0) -> VQImageTokenizer:
    torch.manual_seed(seed)
    return VQImageTokenizer(VQ_IMAGE_CONFIGS["debug"]).eval()


@pytest.fixture(scope="session")
def debug_pipeline(text_encoder):
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    tok = make_debug_tokenizer()
    return TextToImagePipeline(tok, make_debug_model(tok.vocab_size), text_encoder)


@pytest.fixture(scope="session")
def debug_checkpoint(tmp_path_factory, debug_pipeline):
    path = tmp_path_factory.mktemp("ckpt") / "debug"
    debug_pipeline.save_pretrained(path, dtype=None)
    return path
