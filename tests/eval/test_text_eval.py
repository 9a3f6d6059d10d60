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
