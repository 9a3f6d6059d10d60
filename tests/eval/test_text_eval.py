import pytest
from PIL import Image

from mmgen.eval import text_eval as te
from mmgen.worlds import text as tw


def test_cer_and_levenshtein():
    assert te.levenshtein("kitten", "sitting") == 3
    assert te.cer("Hello  world", "Hello world") == 0.0
    assert te.cer("Hxllo world", "Hello world") == pytest.approx(1 / 11)
    with pytest.raises(ValueError):
        te.cer("x", "   ")


def test_colour_and_alignment_read_the_world_exactly():
    for s in tw.generate(30, seed=11):
        assert te.text_color(s.image, s.background) == s.color
        assert te.alignment_ok(s.image, s.background, s.align)
    img = tw.render("Hi", "sans", "large", "red", "white", "left")
    assert te.alignment(img, "white") == "left" and not te.alignment_ok(img, "white", "right")
    blank = Image.new("RGB", (256, 256), tw.BACKGROUNDS["white"])
    assert te.text_color(blank, "white") is None and te.alignment(blank, "white") is None


@pytest.mark.skipif(not te.have_tesseract(), reason="tesseract not installed (make setup installs it)")
def test_ocr_ceiling_on_world_renders():
    res = te.ceiling(n=6, seed=5)
    assert res["all"]["cer"] <= 0.05 and res["all"]["color"] == 1.0 and res["all"]["alignment"] == 1.0
    garbage = Image.new("RGB", (256, 256), (255, 255, 255))
    assert te.cer(te.ocr(garbage), "Hello world") >= 0.9


def test_a_speck_is_stray_ink_and_fails_the_alignment_check():
    for s in tw.generate(12, seed=21):
        assert not te.stray_ink(s.image, s.background)  # the world's own pages: every band is a line
        bands = te.ink_bands(s.image, s.background)
        assert len(bands) == len(s.lines) and all(b[4] > te.STRAY_INK_PIXELS for b in bands)
    s = next(x for x in tw.generate(20, seed=21) if x.align == "left")
    speck = s.image.copy()
    speck.putpixel((200, 2), tw.COLORS[s.color])  # one pixel of ink, in the top margin, far to the right
    assert te.stray_ink(speck, s.background) and te.ink_bands(speck, s.background)[0][4] == 1
    assert te.alignment_ok(s.image, s.background, "left") and not te.alignment_ok(speck, s.background, "left")
    res = te.summarize([{"cer": 0.0, "color_ok": True, "align_ok": False, "stray_ink": True},
                        {"cer": 0.0, "color_ok": True, "align_ok": True, "stray_ink": False}], [1, 3])
    assert res["all"]["stray_ink"] == 0.5 and res["short"]["stray_ink"] == 1.0
