import numpy as np
import pytest

from mmgen.worlds import text as tw


def test_deterministic_and_within_contract():
    a = list(tw.generate(12, seed=3))
    b = list(tw.generate(12, seed=3))
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    for s in a:
        assert s.image.size == (256, 256) and s.image.mode == "RGB"
        assert set(s.text) <= tw.ALPHABET and 1 <= len(s.lines) <= tw.MAX_LINES
        assert f'"{s.text}"' in s.caption and s.color in s.caption and s.align in s.caption
        assert tw.COLORS[s.color] != tw.BACKGROUNDS[s.background]
        assert tw.normalize_text(" ".join(s.lines)) == tw.normalize_text(s.text)
        assert all(w.strip(".,!?").lower() in tw.words() for w in s.text.split())


def test_canonical_caption_format():
    assert tw.canonical_caption("Hello world", "serif", "large", "blue", "white", "center") == \
        'a white card with the text "Hello world" in large blue serif letters, center aligned'


@pytest.mark.parametrize("canvas", [128, 256, 512])
def test_canvases_and_scaled_fonts(canvas):
    s = next(tw.generate(1, seed=1, canvas=canvas))
    assert s.image.size == (canvas, canvas)
    assert tw.font_px("large", canvas) == round(32 * canvas / 256)


def test_alignment_and_colour_are_drawn():
    img = np.asarray(tw.render("Hi", "sans", "large", "red", "white", "left"))
    ys, xs = np.nonzero((np.abs(img.astype(int) - [230, 25, 25]).sum(-1) < 60))
    assert len(xs) > 20 and xs.min() >= 256 // 16 - 1 and xs.max() < 128
    img = np.asarray(tw.render("Hi", "sans", "large", "red", "white", "right"))
    xs = np.nonzero((np.abs(img.astype(int) - [230, 25, 25]).sum(-1) < 60))[1]
    assert xs.min() > 128 and xs.max() <= 256 - 256 // 16


def test_wrap_and_forced_breaks():
    lines = tw.wrap("one two\nthree", "mono", "small")
    assert lines == ["one two", "three"]
    long = " ".join(["water"] * 14)
    assert len(tw.wrap(long, "sans", "small")) > 1


def test_remembered_lengths_wrap_as_the_font_measures():
    # wrap reads lengths through text_length's cache; a greedy wrap measured by a fresh font gives the same lines
    import random

    from PIL import ImageFont

    rng = random.Random(5)
    for _ in range(20):
        name, size = rng.choice(sorted(tw.FONTS)), rng.choice(sorted(tw.SIZES))
        text = " ".join(rng.choice(tw.words()) for _ in range(rng.randint(1, 12)))
        f = ImageFont.truetype(str(tw.FONT_DIR / tw.FONTS[name]), tw.font_px(size, 256))
        width = 256 - 2 * tw.geometry(256, size)[0]
        want, current = [], ""
        for word in text.split():
            trial = f"{current} {word}" if current else word
            current = trial if f.getlength(trial) <= width else (want.append(current) or word)
        want.append(current)
        try:
            assert tw.wrap(text, name, size) == want
        except ValueError as e:  # too many lines: the reference agrees it does not fit
            assert "lines" in str(e) and len(want) > tw.geometry(256, size)[2]


def test_bad_text_is_refused_clearly():
    with pytest.raises(ValueError, match="not allowed"):
        tw.render("caf\u00e9 & bar")
    with pytest.raises(ValueError, match="empty"):
        tw.render('   ')
    with pytest.raises(ValueError, match="lines"):
        tw.render(" ".join(["window"] * 200), size="large")
    with pytest.raises(ValueError, match="unknown"):
        tw.render("hi", color="teal")


def test_paraphrased_captions_keep_the_text():
    for s in tw.generate(10, seed=5, paraphrase=True):
        assert f'"{s.text}"' in s.caption


def test_long_streams_never_overflow_the_canvas():
    # regression: capitalising the first word after wrapping once made a text one line too long (seed 5)
    for canvas in (128, 256):
        for s in tw.generate(600, seed=5, canvas=canvas, paraphrase=True):
            assert len(s.lines) <= tw.geometry(canvas, s.size)[2]


def test_glyph_map_puts_each_letter_over_its_own_ink():
    """text.glyph_map: every inked 4x4 cell lies on a letter of the map, and a line's letters run left to right
    in the order of the text, each over the cells of its advance."""
    from mmgen.eval.text_eval import _ink

    for s in tw.generate(6, seed=11):
        g = tw.glyph_map(s, 4)
        ink = _ink(np.asarray(s.image), s.background).reshape(64, 4, 64, 4).any((1, 3))
        assert g.shape == (64, 64) and g.dtype == np.uint8
        assert (ink & (g > 0)).sum() >= 0.98 * ink.sum()     # anti-aliased specks may fall just outside a band
        assert set(np.unique(g)) <= {0} | {ord(c) for c in s.text}
    text = "Hello world"
    sample = tw.TextSample("", tw.render(text, "sans", "large", "black", "white", "left"), text, [text], "sans",
                           "large", "black", "white", "left", 256)
    g = tw.glyph_map(sample, 4)
    rows = np.nonzero(g.any(1))[0]
    assert len(rows) >= 6 and np.all(np.diff(rows) == 1)        # one band of a 32-px font: 8 or 9 cells tall
    row = [chr(c) for c in g[rows[0]] if c]
    assert "".join(dict.fromkeys(row)) == "Helo wrd"            # first appearances, in the text's order
    for letter, times in (("H", 1), ("l", 3), (" ", 1)):        # each over about its advance's worth of cells
        assert abs(row.count(letter) - times * tw.text_length("sans", 32, letter) / 4) <= times
    with pytest.raises(ValueError, match="divide"):
        tw.glyph_map(sample, 3)
