"""The sentence encoder's word-piece limit: generation refuses an over-long prompt, training reads it as no
condition, and the distillation teacher is asked for the scene's canonical caption instead."""
import itertools
import logging

import pytest
import torch

from mmgen.text.encoder import MAX_PROMPT_CHARS, check_prompts
from mmgen.train.dd import teacher_prompts
from mmgen.worlds import shapes
from tests.conftest import make_debug_model

# a training paraphrase of a three-object scene that the shapes world can draw (frame, synonyms, "little", the
# long cell phrases); the AR run of recipes/seed_p4_ar_s6_ids_more.yaml met one like it at step 22
LONG = ("a picture showing a little cyan five-pointed star in the lower-right area, a little cyan five-pointed "
        "star in the lower-left area and a little pink five-pointed star in the upper-right area in front of a "
        "black background")
SHORT = "a red circle in the center on a black background"


def test_lengths_count_word_pieces_with_the_special_tokens(text_encoder):
    n_long, n_short = text_encoder.lengths([LONG, SHORT])
    assert n_long > text_encoder.max_tokens >= n_short
    assert n_short == len(text_encoder.tokenizer.tokenize(SHORT)) + 2


def test_an_over_long_prompt_is_an_error_unless_training_drops_it(text_encoder):
    with pytest.raises(ValueError, match="too long"):
        text_encoder([SHORT, LONG])
    with pytest.raises(ValueError, match="too_long"):
        text_encoder([SHORT], too_long="cut")
    both = text_encoder([SHORT, LONG], too_long="drop")
    alone = text_encoder([SHORT])
    assert both.states.shape == (2, text_encoder.max_tokens, 384)
    assert not both.mask[1].any()  # the long row: no condition at all, not a cut one
    assert torch.equal(both.mask[0], alone.mask[0])
    real = alone.mask[0]
    assert torch.allclose(both.states[0][real], alone.states[0][real], atol=1e-5)


def test_a_dropped_row_is_the_unconditional_prefix(text_encoder):
    model = make_debug_model(64)
    cond = text_encoder([SHORT, LONG], too_long="drop")
    with torch.no_grad():
        prefix = model.prefix(cond.states, cond.mask)
        null = model.prefix(None, None, batch=1)
    assert torch.allclose(prefix[1], null[0])
    assert not torch.allclose(prefix[0], null[0])


def test_the_teacher_gets_the_canonical_caption_of_an_over_long_paraphrase(text_encoder):
    objects = [shapes.ShapeObject("cyan", "star", "small", 8), shapes.ShapeObject("cyan", "star", "small", 6),
               shapes.ShapeObject("pink", "star", "small", 2)]
    long_sample = shapes.ShapesSample(LONG, None, "black", objects)
    short_sample = shapes.ShapesSample(SHORT, None, "black", [shapes.ShapeObject("red", "circle", "large", 4)])
    prompts = teacher_prompts([short_sample, long_sample], text_encoder)
    assert prompts[0] == SHORT
    assert prompts[1] == shapes.canonical_caption(objects, "black")
    assert text_encoder.lengths(prompts[1:])[0] <= text_encoder.max_tokens


def test_the_worlds_evaluation_paraphrases_fit_the_prefix(text_encoder):
    """Generation refuses prompts over the limit, so the held-out wording that evaluation uses must fit it."""
    captions = [s.caption for s in itertools.islice(shapes.generate(None, seed=5, size=16, held_out=True), 3000)]
    assert max(text_encoder.lengths(captions)) <= text_encoder.max_tokens


def test_a_prompt_over_the_character_limit_is_refused_before_the_encoder_reads_it(text_encoder):
    """5,000 characters in one word are a single [UNK] piece, well inside the word-piece limit: without the
    character limit such a prompt would draw from no condition at all."""
    huge = "x" * (MAX_PROMPT_CHARS + 1)
    assert text_encoder.lengths(["x" * MAX_PROMPT_CHARS])[0] <= text_encoder.max_tokens
    with pytest.raises(ValueError, match="too long: 1001 characters"):
        text_encoder([SHORT, huge])
    with pytest.raises(ValueError, match="too long"):
        check_prompts(huge)


def test_words_the_encoder_cannot_read_are_named_in_a_warning(text_encoder, caplog):
    prompt = "a red \U0001F7E5 circle in the center on a black background"
    assert text_encoder.unread_words(prompt) == ["\U0001F7E5"]
    assert text_encoder.unread_words(SHORT) == []
    with caplog.at_level(logging.WARNING, logger="mmgen.text.encoder"):
        text_encoder([prompt, SHORT])
    assert len(caplog.records) == 1 and "\U0001F7E5" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmgen.text.encoder"):
        text_encoder([prompt], too_long="drop")  # training reads its captions without a word
    assert not caplog.records
