"""The shapes world: seeded (caption, image, attributes) triples, as WORLDS.md section 1 fixes them.

Contract (never change these numbers; add opt-in attributes instead):
64x64 RGB by default (any size; objects scale), backgrounds black / white / gray, an 8-colour palette,
six shapes, two sizes (bounding box 1/6 or 1/3 of the canvas), a 3x3 grid of cells with a jitter of at
most 1/24 of the canvas, one to three objects each in its own cell, anti-aliased solid fills.

mmgen-specific choices, all inside the contract:
- Anti-aliasing renders at 4x and box-filters down.
- The jitter is also clamped so an object's box never leaves its cell (a large box is exactly one cell,
  so large objects are not jittered): neighbouring objects never overlap and every evaluator can read them.
- Two objects of the same colour are never placed in 8-neighbouring cells, so a colour's connected
  regions are exactly its objects.
- ``paraphrase=True`` draws training captions from a set of synonyms and templates; ``held_out=True``
  uses a disjoint set of phrasings (for evaluation on unseen wording). ``exclude_combos`` drops
  (colour, shape) pairs from a stream so they can be held out of training and used to test composition.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLORS = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 20),
    "cyan": (20, 200, 220),
    "pink": (250, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = {"small": 1 / 6, "large": 1 / 3}
# cell index = 3 * row + col
CELLS = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SUPERSAMPLE = 4

# (colour, shape) pairs that the shipped checkpoints never see in training; evaluation asks for them.
HELD_OUT_COMBOS = (("purple", "star"), ("orange", "triangle"), ("cyan", "cross"))

# Training phrasings. Held-out phrasings are disjoint from these and only used for evaluation.
_TRAIN_SIZE = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
_HELD_SIZE = {"small": ("miniature",), "large": ("huge", "giant")}
_TRAIN_CELL = (
    ("at the top left", "in the top left", "in the upper left", "at the upper left", "at the top-left",
     "in the upper-left area"),
    ("at the top", "at the top center", "in the upper middle", "at the top centre", "near the top"),
    ("at the top right", "in the top right", "in the upper right", "at the upper right", "at the top-right",
     "in the upper-right area"),
    ("on the left", "at the left", "on the left side", "to the left", "at the middle left"),
    ("in the center", "in the middle", "at the center", "in the centre", "at the centre"),
    ("on the right", "at the right", "on the right side", "to the right", "at the middle right"),
    ("at the bottom left", "in the bottom left", "in the lower left", "at the lower left", "at the bottom-left",
     "in the lower-left area"),
    ("at the bottom", "at the bottom center", "in the lower middle", "at the bottom centre", "near the bottom"),
    ("at the bottom right", "in the bottom right", "in the lower right", "at the lower right", "at the bottom-right",
     "in the lower-right area"),
)
_HELD_CELL = (
    ("in the top left corner",), ("along the top edge",), ("in the top right corner",),
    ("on the left edge",), ("right in the middle",), ("on the right edge",),
    ("in the bottom left corner",), ("along the bottom edge",), ("in the bottom right corner",),
)
_TRAIN_SHAPE = {s: (s,) for s in SHAPES} | {"square": ("square", "box"), "cross": ("cross", "plus sign"),
                                             "circle": ("circle", "disc"), "star": ("star", "five-pointed star")}
_HELD_SHAPE = {s: (s,) for s in SHAPES} | {"diamond": ("rhombus",), "cross": ("plus",)}
_TRAIN_COLOR = {c: (c,) for c in COLORS} | {"gray": ("gray", "grey")}
_HELD_COLOR = {c: (c,) for c in COLORS} | {"gray": ("grey",)}
_TRAIN_BG = ("on a {} background", "on {}", "against a {} background", "with a {} background",
             "on a {} canvas", "in front of a {} background")
# sentence frames around the objects (training only; "{body}" is the objects, "{bg}" the background phrase)
_TRAIN_FRAMES = ("{body} {bg}", "there is {body} {bg}", "an image of {body} {bg}", "a picture showing {body} {bg}",
                 "{bg_first}, {body}")
_HELD_BG = ("over a {} backdrop", "set on plain {}")
_TRAIN_JOIN = (", ", " and ", " with ")
_HELD_JOIN = ("; ", " plus ")


@dataclass
class ShapeObject:
    color: str
    shape: str
    size: str
    cell: int
    center: tuple[float, float] = (0.0, 0.0)  # (x, y) in pixels of the canvas it was drawn on

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {CELLS[self.cell]}"


@dataclass
class ShapesSample:
    caption: str
    image: Image.Image
    background: str
    objects: list[ShapeObject] = field(default_factory=list)

    @property
    def canonical_caption(self) -> str:
        return canonical_caption(self.objects, self.background)


def canonical_caption(objects: Sequence[ShapeObject], background: str) -> str:
    phrases = [o.phrase() for o in objects]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body} on a {background} background"


def reading_order_caption(objects: Sequence[ShapeObject], background: str) -> str:
    """The canonical caption with objects in cell (reading) order: what a model trained to see writes."""
    return canonical_caption(sorted(objects, key=lambda o: o.cell), background)


def _parsed(caption: str) -> tuple[list[ShapeObject], str] | None:
    from mmgen.eval.shapes_eval import parse_prompt  # the parser lives with the judge; imported late (no cycle)

    try:
        return parse_prompt(caption)
    except ValueError:
        return None


def reading_caption(caption: str) -> str | None:
    """A caption in the world's grammar -> its ``reading_order_caption``; None when it does not parse
    (``shapes_eval.parse_prompt``)."""
    parsed = _parsed(caption)
    return None if parsed is None else reading_order_caption(*parsed)


def mirror_caption(caption: str) -> str | None:
    """The reading-order caption of the scene mirrored left to right: every shape of the world is symmetric
    about its vertical axis, so mirroring moves each object to the other column and changes nothing else.
    None when the caption does not parse."""
    parsed = _parsed(caption)
    if parsed is None:
        return None
    objects, background = parsed
    for o in objects:
        o.cell = 3 * (o.cell // 3) + 2 - o.cell % 3
    return reading_order_caption(objects, background)


def paraphrase_caption(objects: Sequence[ShapeObject], background: str, rng: random.Random,
                       held_out: bool = False) -> str:
    """A caption with the same meaning in other words; held-out wording never appears in training."""
    sizes, cells, shapes, colors, bgs, joins = (
        (_HELD_SIZE, _HELD_CELL, _HELD_SHAPE, _HELD_COLOR, _HELD_BG, _HELD_JOIN) if held_out
        else (_TRAIN_SIZE, _TRAIN_CELL, _TRAIN_SHAPE, _TRAIN_COLOR, _TRAIN_BG, _TRAIN_JOIN))
    objs = list(objects)
    rng.shuffle(objs)  # the order of mention carries no meaning
    phrases = []
    for o in objs:
        size, shape, cell = rng.choice(sizes[o.size]), rng.choice(shapes[o.shape]), rng.choice(cells[o.cell])
        article = "an" if size[0] in "aeiou" else "a"
        phrases.append(f"{article} {size} {o.color} {shape} {cell}")
    join = rng.choice(joins)
    body = phrases[0] if len(phrases) == 1 else join.join(phrases[:-1]) + " and " + phrases[-1]
    if join.strip() == "plus":
        body = phrases[0] if len(phrases) == 1 else " plus ".join(phrases)
    bg = rng.choice(bgs).format(rng.choice(colors.get(background, (background,))))
    if held_out or rng.random() < 0.5:  # held-out captions draw nothing more: evaluation scenes stay fixed
        return f"{body} {bg}"
    frame = rng.choice(_TRAIN_FRAMES)
    if "{bg_first}" in frame and not bg.startswith(("on a", "against")):
        frame = _TRAIN_FRAMES[0]
    return frame.format(body=body, bg=bg, bg_first=bg[0].upper() + bg[1:])


def shape_polygons(shape: str, cx: float, cy: float, side: float) -> list[list[tuple[float, float]]] | None:
    """Polygon(s) of a shape whose bounding box (side x side) is centred at (cx, cy); None for a circle."""
    h = side / 2
    if shape == "square":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "diamond":
        return [[(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]]
    if shape == "cross":
        a = side / 6  # arm width one third of the box
        return [[(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy + h), (cx - a, cy + h)],
                [(cx - h, cy - a), (cx + h, cy - a), (cx + h, cy + a), (cx - h, cy + a)]]
    if shape == "star":
        # five points, apex up; outer radius chosen so the star's bounding box fits the side exactly
        outer = side / (2 * math.sin(math.radians(72)))
        inner = outer * math.sin(math.radians(18)) / math.sin(math.radians(126))
        height = outer * (1 + math.cos(math.radians(36)))
        top = cy - height / 2
        ox, oy = cx, top + outer
        pts = []
        for i in range(10):
            r = outer if i % 2 == 0 else inner
            ang = math.radians(-90 + 36 * i)
            pts.append((ox + r * math.cos(ang), oy + r * math.sin(ang)))
        return [pts]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    polys = shape_polygons(shape, cx, cy, side)
    if polys is None:
        h = side / 2
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        for p in polys:
            draw.polygon(p, fill=fill)


def render(objects: Sequence[ShapeObject], background: str, size: int = 64) -> Image.Image:
    """Render objects (centres in pixels of a ``size`` canvas) anti-aliased on the background."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(big)
    for o in objects:
        if o.color not in COLORS:
            raise ValueError(f"unknown colour {o.color!r}; expected one of {tuple(COLORS)}")
        side = SIZES[o.size] * size * SUPERSAMPLE
        draw_shape(draw, o.shape, o.center[0] * SUPERSAMPLE, o.center[1] * SUPERSAMPLE, side, COLORS[o.color])
    return big.resize((size, size), Image.BOX)


def cell_center(cell: int, size: int) -> tuple[float, float]:
    row, col = divmod(cell, 3)
    return ((col + 0.5) * size / 3, (row + 0.5) * size / 3)


def _neighbours(a: int, b: int) -> bool:
    (ra, ca), (rb, cb) = divmod(a, 3), divmod(b, 3)
    return max(abs(ra - rb), abs(ca - cb)) <= 1


def place(objects: Sequence[ShapeObject], size: int, rng: random.Random | None) -> list[ShapeObject]:
    """Give each object its jittered centre on a ``size`` canvas (no jitter when rng is None)."""
    out = []
    for o in objects:
        cx, cy = cell_center(o.cell, size)
        side = SIZES[o.size] * size
        room = max(0.0, (size / 3 - side) / 2 - 0.5)  # keep the box inside its cell
        j = min(size / 24, room)
        if rng is not None and j > 0:
            cx += rng.uniform(-j, j)
            cy += rng.uniform(-j, j)
        out.append(ShapeObject(o.color, o.shape, o.size, o.cell, (cx, cy)))
    return out


def sample_scene(rng: random.Random, num_objects: int | None = None,
                 exclude_combos: Sequence[tuple[str, str]] = (),
                 only_combos: Sequence[tuple[str, str]] | None = None) -> tuple[list[ShapeObject], str]:
    """Draw attributes of one scene (objects without centres) and its background."""
    n = num_objects if num_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= 3:
        raise ValueError(f"num_objects must be 1, 2 or 3, got {n}")
    excluded = set(exclude_combos)
    while True:
        cells = rng.sample(range(9), n)
        objs = []
        for i, cell in enumerate(cells):
            if only_combos is not None and i == 0:
                color, shape = rng.choice(list(only_combos))  # the first object carries the asked combo
            else:
                while True:
                    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                    if (color, shape) not in excluded:
                        break
            objs.append(ShapeObject(color, shape, rng.choice(tuple(SIZES)), cell))
        clash = any(a.color == b.color and _neighbours(a.cell, b.cell)
                    for i, a in enumerate(objs) for b in objs[i + 1:])
        if not clash:
            return objs, rng.choice(tuple(BACKGROUNDS))


def generate(n: int | None, seed: int, size: int = 64, paraphrase: bool = False, held_out: bool = False,
             num_objects: int | None = None, exclude_combos: Sequence[tuple[str, str]] = (),
             only_combos: Sequence[tuple[str, str]] | None = None) -> Iterator[ShapesSample]:
    """Stream ``n`` samples (``None``: forever), deterministic for ``seed``.

    ``paraphrase`` draws the caption from training phrasings, ``held_out`` from the evaluation-only ones;
    otherwise the caption is canonical.
    """
    if size < 8:
        raise ValueError(f"canvas size must be at least 8 pixels, got {size}")
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        objs, bg = sample_scene(rng, num_objects, exclude_combos, only_combos)
        objs = place(objs, size, rng)
        if held_out:
            caption = paraphrase_caption(objs, bg, rng, held_out=True)
        elif paraphrase:
            caption = paraphrase_caption(objs, bg, rng) if rng.random() < 0.7 else canonical_caption(objs, bg)
        else:
            caption = canonical_caption(objs, bg)
        yield ShapesSample(caption, render(objs, bg, size), bg, objs)
        i += 1


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
