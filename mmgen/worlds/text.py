"""The text world: seeded long-text images, as WORLDS.md section 2 fixes them.

Contract: 256x256 RGB by default (128 and 512 too; font sizes scale with the canvas), characters from
``A-Z a-z 0-9 space . , ! ? ' -``, words from the shipped word list (``data/words.txt``), wrapped greedily at
word boundaries to the canvas width minus a margin, 1 to 8 lines (a newline in the text forces a break);
fonts DejaVu Sans / Serif / Sans Mono (Debian's fonts-dejavu-core), sizes small 16 / medium 24 / large 32 px
at 256x256, text colour from the shapes palette plus black and white, backgrounds white / black / beige,
alignment left / center / right. Caption:
``a white card with the text "Hello world" in large blue serif letters, center aligned``.

mmgen-specific choices, inside the contract: the margin is 1/16 of the canvas on every side; lines are
``round(1.25 * font size)`` apart and the block is centred vertically; the text colour never equals the
background; a text that needs more lines than the canvas holds at that size is refused, never truncated.
Comparisons fold every run of whitespace into one space (``normalize_text``).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmgen.worlds.shapes import COLORS as SHAPE_COLORS

ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,!?'-")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = {"sans": "DejaVuSans.ttf", "serif": "DejaVuSerif.ttf", "mono": "DejaVuSansMono.ttf"}
SIZES = {"small": 16, "medium": 24, "large": 32}  # pixels at a 256x256 canvas
COLORS = {**SHAPE_COLORS, "black": (0, 0, 0), "white": (255, 255, 255)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "beige": (245, 240, 220)}
ALIGNS = ("left", "center", "right")
MAX_LINES = 8
CANVASES = (128, 256, 512)
WORDS_FILE = Path(__file__).resolve().parent / "data" / "words.txt"

_TRAIN_CARD = ("card", "sign", "poster", "page", "board")
_TRAIN_TEMPLATES = (
    'a {bg} {card} with the text "{text}" in {size} {color} {font} letters, {align} aligned',
    'a {bg} {card} that says "{text}" in {size} {color} {font} letters, {align} aligned',
    '"{text}" written in {size} {color} {font} letters on a {bg} {card}, {align} aligned',
    'a {bg} {card} showing "{text}", {size} {color} {font} type, aligned {align}',
)
_SIZE_WORDS = {"small": ("small",), "medium": ("medium", "mid-sized"), "large": ("large", "big")}
_FONT_WORDS = {"sans": ("sans", "sans-serif"), "serif": ("serif",), "mono": ("mono", "monospace")}


@lru_cache(maxsize=None)
def words() -> tuple[str, ...]:
    return tuple(w for w in WORDS_FILE.read_text().split() if w)


def normalize_text(text: str) -> str:
    """Fold every run of whitespace (newlines included) into one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=64)
def font(name: str, px: int) -> ImageFont.FreeTypeFont:
    if name not in FONTS:
        raise ValueError(f"unknown font {name!r}; choose from {sorted(FONTS)}")
    path = FONT_DIR / FONTS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install Debian's fonts-dejavu-core (make setup does)")
    return ImageFont.truetype(str(path), px)


@lru_cache(maxsize=1 << 16)
def text_length(name: str, px: int, text: str) -> float:
    """``font(name, px).getlength(text)``, remembered: drawing a page's random text wraps each longer prefix
    again, so the same lines are measured over and over (three quarters of the world's rendering time)."""
    return font(name, px).getlength(text)


def font_px(size: str, canvas: int) -> int:
    if size not in SIZES:
        raise ValueError(f"unknown text size {size!r}; choose from {sorted(SIZES)}")
    return max(6, round(SIZES[size] * canvas / 256))


def geometry(canvas: int, size: str) -> tuple[int, int, int]:
    """(margin, line height, most lines that fit) for a canvas and a text size."""
    px = font_px(size, canvas)
    margin = canvas // 16
    line_h = round(1.25 * px)
    return margin, line_h, min(MAX_LINES, (canvas - 2 * margin) // line_h)


def check_text(text: str) -> None:
    if not isinstance(text, str) or not normalize_text(text):
        raise ValueError("the quoted text is empty: put the words to write between the quotes")
    bad = sorted({c for c in text if c not in ALPHABET and c != "\n"})
    if bad:
        raise ValueError(f"the text world writes only A-Z a-z 0-9 space . , ! ? ' - ; these characters are not "
                         f"allowed: {''.join(bad)!r}")


def wrap(text: str, font_name: str, size: str, canvas: int = 256) -> list[str]:
    """Greedy word wrap to the canvas width minus the margins; newlines force breaks. Raises ValueError when
    a word is wider than a line or the text needs more lines than fit."""
    check_text(text)
    px = font_px(size, canvas)
    margin, _, max_lines = geometry(canvas, size)
    width = canvas - 2 * margin
    lines: list[str] = []
    for para in text.split("\n"):
        current = ""
        for word in para.split():
            if text_length(font_name, px, word) > width:
                raise ValueError(f"the word {word!r} is wider than a line at {size} size on a {canvas}x{canvas} canvas")
            trial = f"{current} {word}" if current else word
            if text_length(font_name, px, trial) <= width:
                current = trial
            else:
                lines.append(current)
                current = word
        if current:
            lines.append(current)
    if not lines:
        raise ValueError("the quoted text is empty: put the words to write between the quotes")
    if len(lines) > max_lines:
        raise ValueError(f"the text needs {len(lines)} lines; at {size} size a {canvas}x{canvas} canvas holds "
                         f"{max_lines}: shorten it or choose a smaller size")
    return lines


_LETTERING = r"(?:letters|lettering|type|typeface|font|characters|print)"


def _named(words_by_key: dict, prompt: str) -> tuple[str | None, list[str]]:
    """(the key said of the lettering: the word nearest before "letters", "type", ... within four words, as
    in "large blue serif letters"; every key named anywhere). Longer words win where they overlap
    ("sans-serif" and "sans serif" are sans, not serif)."""
    pairs = sorted(((w, k) for k, ws in words_by_key.items() for w in (*ws, k)), key=lambda p: -len(p[0]))
    key_of = {w.lower(): k for w, k in pairs}
    word_re = re.compile(rf"(?<![\w-])({'|'.join(re.escape(w) for w, _ in pairs)})(?![\w-])", re.IGNORECASE)
    said = None
    for m in re.finditer(rf"((?:[\w-]+\s+){{1,4}}){_LETTERING}\b", prompt, flags=re.IGNORECASE):
        hits = word_re.findall(m.group(1))
        if hits:
            said = key_of[hits[-1].lower()]
            break
    return said, [key_of[w.lower()] for w in word_re.findall(prompt)]


def check_prompt_text(rest: str, text: str, canvas: int = 256) -> list[str]:
    """What a text-world checkpoint checks before it writes: ``text`` (the prompt's quoted part) is not empty,
    uses only the world's alphabet, and fits the canvas at the size the prompt gives the lettering (``rest``:
    the prompt without the quoted text; "large" in "a large poster" says nothing of the letters, so with no
    size said of them the check uses small: only what fits at no size is refused). Returns the wrapped lines;
    a ValueError says what is wrong."""
    if not text.strip():
        raise ValueError('this checkpoint writes the text between double quotes, and the prompt has none (or an '
                         'empty quote): e.g. a white card with the text "Hello world" in large blue serif letters')
    size = _named(_SIZE_WORDS, rest)[0] or "small"
    said, named = _named({**_FONT_WORDS, "sans": (*_FONT_WORDS["sans"], "sans serif")}, rest)
    return wrap(text, said or (named[0] if named else "sans"), size, canvas)


def render(text: str, font_name: str = "sans", size: str = "medium", color: str = "black",
           background: str = "white", align: str = "center", canvas: int = 256) -> Image.Image:
    if color not in COLORS:
        raise ValueError(f"unknown text colour {color!r}; choose from {sorted(COLORS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {sorted(BACKGROUNDS)}")
    if not isinstance(canvas, int) or canvas < 64:
        raise ValueError(f"canvas must be an integer of at least 64 pixels, got {canvas!r}")
    f, placed = layout(text, font_name, size, align, canvas)
    img = Image.new("RGB", (canvas, canvas), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for line, x, y in placed:
        draw.text((x, y), line, font=f, fill=COLORS[color])
    return img


def layout(text: str, font_name: str, size: str, align: str, canvas: int
           ) -> tuple[ImageFont.FreeTypeFont, list[tuple[str, float, int]]]:
    """Where ``render`` draws each wrapped line: (the font, [(line, x, y) of its top-left corner])."""
    if align not in ALIGNS:
        raise ValueError(f"unknown alignment {align!r}; choose from {ALIGNS}")
    lines = wrap(text, font_name, size, canvas)
    f = font(font_name, font_px(size, canvas))
    margin, line_h, _ = geometry(canvas, size)
    ascent, descent = f.getmetrics()
    top = (canvas - len(lines) * line_h) // 2 + (line_h - ascent - descent) // 2
    placed = []
    for i, line in enumerate(lines):
        w = f.getlength(line)
        x = {"left": margin, "center": (canvas - w) / 2, "right": canvas - margin - w}[align]
        placed.append((line, x, top + i * line_h))
    return f, placed


def line_rows(sample: "TextSample", cell: int) -> list[np.ndarray]:
    """Per wrapped line, the rows of ``cell`` x ``cell`` blocks whose centre lies in the line's band (its
    font's ascent to descent below where ``render`` draws it), top to bottom. Lines are
    ``round(1.25 * font size)`` apart and a band is about 1.16 font sizes tall, so bands never share a row."""
    return _placed_rows(sample, cell)[2]


def _placed_rows(sample: "TextSample", cell: int):
    """(the font, ``layout``'s placed lines, ``line_rows``), from one layout."""
    if sample.canvas % cell:
        raise ValueError(f"the cell ({cell} px) must divide the canvas ({sample.canvas} px)")
    f, placed = layout(sample.text, sample.font, sample.size, sample.align, sample.canvas)
    ascent, descent = f.getmetrics()
    centres = np.arange(sample.canvas // cell) * cell + cell / 2
    return f, placed, [np.nonzero((centres >= y) & (centres < y + ascent + descent))[0] for _, _, y in placed]


def glyph_map(sample: "TextSample", cell: int) -> np.ndarray:
    """The letter drawn over each ``cell`` x ``cell`` block of a page: (canvas / cell, canvas / cell) uint8,
    the character's byte where the block's centre lies in a line's band (``line_rows``) within that
    character's advance, 0 elsewhere (spaces are 32). What a model writing the page by blocks must choose
    at each one (``ARConfig.glyph_head``)."""
    f, placed, bands = _placed_rows(sample, cell)
    n = sample.canvas // cell
    centres = np.arange(n) * cell + cell / 2
    out = np.zeros((n, n), np.uint8)
    for (line, x, _), rows in zip(placed, bands):
        # advance edges: x + the width of each prefix, measured as render measures lines (not through the
        # text_length cache, which these one-off prefixes would only crowd)
        edges = x + np.array([f.getlength(line[:k]) for k in range(len(line) + 1)])
        k = np.searchsorted(edges, centres, side="right") - 1             # the character whose advance holds it
        inside = (k >= 0) & (k < len(line))
        codes = np.where(inside, np.frombuffer(line.encode("ascii"), np.uint8)[k.clip(0, len(line) - 1)], 0)
        out[rows] = codes[None, :]
    return out


@dataclass
class TextSample:
    caption: str
    image: Image.Image
    text: str            # exactly what is written (newlines where the caption's text forces breaks: none)
    lines: list[str]     # the wrapped lines as rendered
    font: str
    size: str
    color: str
    background: str
    align: str
    canvas: int


def canonical_caption(text: str, font_name: str, size: str, color: str, background: str, align: str) -> str:
    return f'a {background} card with the text "{text}" in {size} {color} {font_name} letters, {align} aligned'


def _paraphrase(rng: random.Random, text, font_name, size, color, background, align) -> str:
    return rng.choice(_TRAIN_TEMPLATES).format(
        bg=background, card=rng.choice(_TRAIN_CARD), text=text, size=rng.choice(_SIZE_WORDS[size]), color=color,
        font=rng.choice(_FONT_WORDS[font_name]), align=align)


def _random_text(rng: random.Random, target_lines: int, font_name: str, size: str, canvas: int) -> str:
    vocab = words()
    out: list[str] = []
    text = ""
    while True:
        w = rng.choice(vocab)
        if rng.random() < 0.15:
            w = w.capitalize()
        if rng.random() < 0.06:
            w += rng.choice(".,!?")
        trial = " ".join(out + [w])
        trial = trial[0].upper() + trial[1:]  # capitalised before wrapping: a wider first word can add a line
        try:
            n = len(wrap(trial, font_name, size, canvas))
        except ValueError:
            break
        if n > target_lines:
            break
        out.append(w)
        text = trial
    if not text:
        w = rng.choice(vocab)
        text = w[0].upper() + w[1:]
    return text


def generate(n: int | None = None, seed: int = 0, canvas: int = 256, paraphrase: bool = False,
             min_lines: int = 1, max_lines: int = MAX_LINES) -> Iterator[TextSample]:
    """Yield n samples (None: forever), deterministic for a seed."""
    if canvas not in CANVASES and (not isinstance(canvas, int) or canvas < 64):
        raise ValueError(f"canvas must be an integer of at least 64 pixels, got {canvas!r}")
    if not 1 <= min_lines <= max_lines <= MAX_LINES:
        raise ValueError(f"need 1 <= min_lines <= max_lines <= {MAX_LINES}")
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        font_name = rng.choice(sorted(FONTS))
        size = rng.choice(sorted(SIZES))
        background = rng.choice(sorted(BACKGROUNDS))
        color = rng.choice([c for c in sorted(COLORS) if COLORS[c] != BACKGROUNDS[background]])
        align = rng.choice(ALIGNS)
        fits = geometry(canvas, size)[2]
        hi = min(max_lines, fits)
        if hi < min_lines:
            continue
        target = rng.randint(min_lines, hi)
        text = _random_text(rng, target, font_name, size, canvas)
        lines = wrap(text, font_name, size, canvas)
        image = render(text, font_name, size, color, background, align, canvas)
        caption = (_paraphrase(rng, text, font_name, size, color, background, align) if paraphrase
                   else canonical_caption(text, font_name, size, color, background, align))
        yield TextSample(caption, image, text, lines, font_name, size, color, background, align, canvas)
        i += 1


def image_array(sample: TextSample) -> np.ndarray:
    return np.asarray(sample.image)
