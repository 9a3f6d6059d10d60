"""Quoted prompt text as byte tokens: the split, the fixed slot, and that the bytes reach the model."""
import pytest
import torch
import yaml

from mmgen.model.transformer import MMGenTransformer
from mmgen.model.vocab import Vocabulary
from mmgen.pipelines.text_to_image import TextToImagePipeline
from mmgen.text.quoted import byte_slot, split_prompts, split_quoted
from tests.conftest import make_debug_model

PROMPT = 'a white card with the text "Hello world" in large blue serif letters, center aligned'


def test_split_quoted():
    assert split_quoted(PROMPT) == ('a white card with the text "" in large blue serif letters, center aligned',
                                    "Hello world")
    assert split_quoted("a red circle") == ("a red circle", "")
    assert split_quoted('say \u201cHi\u201d then "there"') == ('say "" then ""', "Hi\nthere")
    assert split_quoted('empty "" quotes') == ('empty "" quotes', "")


def test_byte_slot_is_fixed_left_padded_and_refuses_overflow():
    v = Vocabulary.build({"image": 8})
    slot = byte_slot(["Hi", "", "\u00e9"], v, 4)
    pad, bot, eot = (v.special(s) for s in ("<pad>", "<bot>", "<eot>"))
    lo = v.range("byte")[0]
    assert slot.shape == (3, 6)
    assert slot[0].tolist() == [pad, pad, bot, lo + ord("H"), lo + ord("i"), eot]
    assert slot[1].tolist() == [pad] * 4 + [bot, eot]
    assert slot[2].tolist() == [pad, pad, bot, lo + 0xC3, lo + 0xA9, eot]  # UTF-8, two bytes
    with pytest.raises(ValueError, match="at most 4"):
        byte_slot(["Hello"], v, 4)
    rest, slot, empty = split_prompts([PROMPT], v, 16)
    assert rest[0].count('""') == 1 and (empty[0, :-2] == pad).all()


def _bytes_pipeline(text_encoder, length=16):
    from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextTokenizer

    torch.manual_seed(0)
    tok = BinaryTextTokenizer(BINARY_TEXT_CONFIGS["debug"]).eval()  # a text-world canvas (64x64)
    base = make_debug_model(tok.vocab_size)
    cfg = type(base.config)(**{**base.config.__dict__, "text_bytes": length})
    torch.manual_seed(0)
    model = MMGenTransformer(cfg).eval()
    with torch.no_grad():
        model.modality_embed.weight.normal_(0, 0.5)
        model.llama.embed_tokens.weight.normal_(0, 1.0)
    return TextToImagePipeline(tok, model, text_encoder, {"guidance_scale": 2.0}, world="text")


def test_quoted_bytes_reach_the_model_and_batch_equals_single(text_encoder):
    pipe = _bytes_pipeline(text_encoder)
    run = lambda prompts, seed=0: pipe(prompts, generator=[torch.Generator().manual_seed(seed + i)  # noqa: E731
                                                            for i in range(len(prompts))], output_type="pt").images
    a = run([PROMPT])
    # same sentence-encoder input, different bytes -> different next-token logits
    m = pipe.model
    rest, slot, _ = split_prompts([PROMPT, PROMPT.replace("Hello world", "Goodbye moon")], m.vocab, 16)
    assert rest[0] == rest[1]
    boi = torch.full((2, 1), m.vocab.special("<boi>"))
    logits = m.prefill(pipe.encode_prompts(rest), torch.cat([slot, boi], 1), m.new_cache(2, 200))
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    batch = run([PROMPT, 'a black card with the text "Hi" in small red mono letters, left aligned'])
    assert torch.allclose(batch[:1], a, atol=1e-4)  # the fixed slot: a prompt gets the same image alone or in a batch
    with pytest.raises(ValueError, match="at most 16"):
        pipe('a card with the text "this text is far too long for the slot"')
    # the text world's bad inputs are refused before any sampling, naming the prompt
    for prompt, match in [('a card with the text "Grüße" in small red mono letters', "not allowed: 'ßü'"),
                          ('a card with the text "" in small red mono letters', "none \\(or an empty quote\\)"),
                          ("a card with no quoted text at all", "between double quotes"),
                          ('a card with the text "one two\nthree\nfour\nfive\nsix\nseven" in large letters',
                           "needs 6 lines; at large size a 64x64 canvas holds 5")]:
        with pytest.raises(ValueError, match=match) as err:
            pipe(prompt)
        assert prompt[:20] in str(err.value)
    # the size said of the letters counts, not the card's; a typographic apostrophe is the world's '
    six = 'with the text "A\nB\nC\nD\nE\nF"'  # six lines: a 64x64 canvas holds 7 small, 5 large
    pipe(f"a large poster {six} in small letters", output_type="pt")
    with pytest.raises(ValueError, match="needs 6 lines; at large size"):
        pipe(f"a small poster {six} in large letters")
    pipe('a card with the text "Don\u2019t stop" in small letters', output_type="pt")
    # the same model trained on a user's captions (no world) checks only the slot's length
    pipe.world = None
    pipe("a card with no quoted text at all", output_type="pt")
    pipe.world = "text"
    with pytest.raises(ValueError, match="AR sampler"):
        pipe.student = object()  # any student: the byte slot is refused before it is used
        try:
            pipe(PROMPT, sampler="dd")
        finally:
            pipe.student = None


def test_text_world_training_with_byte_slot(tmp_path):
    from mmgen.tokenizers.vq_image import VQ_IMAGE_CONFIGS, VQImageTokenizer
    from mmgen.train.ar import train_ar

    cfg = VQ_IMAGE_CONFIGS["debug"]
    tok = VQImageTokenizer(type(cfg)(**{**cfg.__dict__, "image_size": 64})).eval()
    tok.save_pretrained(tmp_path / "tok")
    recipe = tmp_path / "ar.yaml"
    recipe.write_text(yaml.safe_dump({"architecture": {"size": "debug", "text_bytes": 160, "max_positions": 512},
                                      "training": {"world": "text", "steps": 2, "batch_size": 2, "save_every": 2,
                                                   "warmup": 1}}))
    pipe_dir = train_ar(str(recipe), str(tmp_path / "tok"), str(tmp_path / "ar"), progress=False)
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    assert pipe.model.config.text_bytes == 160
    out = pipe('a white card with the text "Hi there" in small black sans letters, left aligned',
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"architecture": {"size": "debug"}, "training": {"world": "video", "steps": 1}}))
    with pytest.raises(ValueError, match="unknown training world"):
        train_ar(str(bad), str(tmp_path / "tok"), str(tmp_path / "bad"), progress=False)


def test_the_training_world_is_saved_with_the_pipeline(tmp_path, text_encoder):
    pipe = _bytes_pipeline(text_encoder)
    pipe.save_pretrained(tmp_path / "p", dtype=None)
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "p", text_encoder=text_encoder)
    assert loaded.world == "text"
    with pytest.raises(ValueError, match="between double quotes"):
        loaded("a card with no quoted text at all")
