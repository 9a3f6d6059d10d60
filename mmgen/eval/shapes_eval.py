"""shapes-eval: the classical judge of the shapes world (WORLDS.md section 1), no learned model.

Method
------
1. Colour labelling. Every pixel takes the nearest of the 8 palette colours and 3 backgrounds, but only
   when its RGB euclidean distance is below a tolerance (default 48, about half the smallest gap between
   two reference colours); anti-aliased edges and garbage stay unlabelled. The background is the most
   frequent labelled background class, or None when it covers less than 30 % of the canvas.
2. Regions. For each palette colour the 8-connected regions are found, growing (hysteresis) through
   pixels whose nearest colour is that colour within 1.5 x the tolerance, so that an object whose colour
   is blotchy in a generated image stays one region. A region counts only if its labelled core survives
   a 1-pixel erosion (4-connected structuring element: lines and specks vanish) and its area is at least
   a quarter of the area of the smallest legitimate object (a small star), measured by rendering that
   star with the world's own geometry at this canvas size. A region's area is its soft coverage (below),
   so blur that shrinks the cleanly coloured core of a small object does not make it vanish. The world
   never puts two same-coloured objects in neighbouring cells, so one object is one region.
3. Classification. Each region becomes a soft coverage map: on its pixels and on the unlabelled or
   background-coloured pixels within 2 px of it, the fraction of object colour, read by projecting the
   pixel onto the line from the local background colour to the region's colour (this recovers
   anti-aliased and slightly blurred edges); 0 elsewhere. Each of the 6 shapes x 2 sizes is rendered with
   the world's ``draw_shape`` at 4x supersampling and box-filtered down to a soft template (cached per
   quarter-pixel offset). The template is first centred so that its centroid falls on the region's
   centroid (for the right shape this puts the template's bounding-box centre on the object's), then a
   short quarter-pixel hill climb refines the position; at the fitted position slightly blurred versions
   of the template (Gaussian sigma 0.5 and 1 px) are tried too, for blurry generated images. The score is
   the soft IoU sum(min) / sum(max) (an area ratio bound skips templates that cannot win); the best
   (shape, size) wins and its fitted bounding-box centre gives the 3x3 cell.
4. Judging. A prompt is satisfied when the background matches, every requested object has its own counted
   region with the same colour, shape, size and cell and IoU >= 0.5, and no other region is counted.

``parse_prompt`` reads the canonical caption grammar and the training and held-out paraphrases of
``mmgen.worlds.shapes`` by scanning for object mentions (article, size, colour, shape, location) and one
background phrase with regexes built from the world's own vocabulary tables; any other leftover text than
joins ("," ";" "and" "plus") is an error. ``ceiling`` scores the judge on the world's own renders.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from mmgen.worlds import shapes as world
from mmgen.worlds.shapes import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, SUPERSAMPLE, ShapeObject

DEFAULT_TOLERANCE = 48.0          # max RGB distance for a pixel to take a reference colour's label
LOOSE_TOLERANCE_FACTOR = 1.5      # regions grow through pixels this much further off (hysteresis)
MIN_BACKGROUND_FRACTION = 0.30    # the background class must cover at least this share of the canvas
MIN_AREA_FRACTION = 0.25          # counted regions cover at least this share of a small star's area
SMALLEST_OBJECT = ("star", "small")
DEFAULT_MIN_IOU = 0.5             # a detected object must fit its template at least this well
EROSION_ITERATIONS = 1            # regions must survive this many 1-pixel erosions
EDGE_ZONE_PX = 2                  # unlabelled pixels this close to a region may hold its soft edge
BACKGROUND_RING_PX = 3            # the local background is read within this distance of a region
WINDOW_MARGIN_PX = 3              # template window = one cell side plus this margin on each side
CLIMB_STEPS = (2, 1)              # hill-climb step sizes, in quarter pixels
MAX_CLIMB_MOVES = 8               # moves per step size
QUARTERS = SUPERSAMPLE            # template offsets are quantised to 1 / SUPERSAMPLE pixel
BLUR_LEVELS_PX = (0.0, 0.5, 1.0)  # template softness (Gaussian sigma) levels, for blurry generated images
DEFAULT_CEILING_SEED = 20240601
NUM_OBJECTS_RANGE = (1, 3)
ATTRIBUTE_NAMES = ("color", "shape", "size", "cell")
ERROR_KINDS = ("background", *ATTRIBUTE_NAMES, "fit", "object_missing", "object_extra")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_LABEL_RGB = np.array([COLORS[c] for c in COLORS] + [BACKGROUNDS[b] for b in BACKGROUNDS], dtype=np.float64)
_NUM_PALETTE = len(COLORS)
_UNLABELLED = -1

ImageLike = Union[Image.Image, np.ndarray]
ObjectSpec = Union[ShapeObject, Mapping[str, Any]]
Scene = tuple[Sequence[ObjectSpec], str]


@dataclass
class Region:
    """One counted connected region of a palette colour and its best template match.

    bbox is (x0, y0, x1, y1) in pixels with x1, y1 exclusive; center is the fitted template's bounding-box
    centre (x, y) in pixel units; area is the region's soft coverage in pixels (anti-aliased edges count
    by their share of the colour).
    """
    color: str
    shape: str
    size: str
    cell: int
    area: float
    iou: float
    bbox: tuple[int, int, int, int]
    center: tuple[float, float] = (0.0, 0.0)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {CELLS[self.cell]}"


# ----------------------------------------------------------------------------------------------- analysis

def _to_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image array, got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"shapes-eval expects a square canvas, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _nearest(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into palette + backgrounds (palette first) of each pixel's nearest colour, and its distance."""
    dist = np.linalg.norm(rgb[:, :, None, :] - _LABEL_RGB[None, None], axis=-1)
    return dist.argmin(axis=-1), dist.min(axis=-1)


def label_pixels(rgb: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Index into palette + backgrounds (palette first) of each pixel's colour, -1 when none is close."""
    nearest, dist = _nearest(rgb)
    return np.where(dist < tolerance, nearest, _UNLABELLED)


@lru_cache(maxsize=None)
def _window(canvas: int) -> tuple[int, int]:
    """(side, half) of the square template window for a canvas."""
    side = int(math.ceil(canvas / 3)) + 2 * WINDOW_MARGIN_PX
    return side, side // 2


@lru_cache(maxsize=8192)
def _template(canvas: int, shape: str, size: str, qx: int, qy: int, blur: int = 0) -> np.ndarray:
    """Soft coverage of a shape in the template window, bbox centre at (half + qx / QUARTERS,
    half + qy / QUARTERS) in window pixels, softened by a Gaussian of width BLUR_LEVELS_PX[blur]."""
    if blur:
        cov = ndimage.gaussian_filter(_template(canvas, shape, size, qx, qy), BLUR_LEVELS_PX[blur],
                                      mode="constant")
        cov.setflags(write=False)
        return cov
    side, half = _window(canvas)
    hi = Image.new("L", (side * SUPERSAMPLE, side * SUPERSAMPLE), 0)
    # one quarter-pixel offset is one supersampled pixel (QUARTERS == SUPERSAMPLE)
    world.draw_shape(ImageDraw.Draw(hi), shape, half * SUPERSAMPLE + qx, half * SUPERSAMPLE + qy,
                     SIZES[size] * canvas * SUPERSAMPLE, 255)
    cov = np.asarray(hi, dtype=np.float64) / 255.0
    cov = cov.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov


@lru_cache(maxsize=None)
def _centroid_offset(canvas: int, shape: str, size: str) -> tuple[float, float]:
    """Centroid minus bounding-box centre of a shape's coverage (e.g. a triangle's centroid sits lower)."""
    cov = _template(canvas, shape, size, 0, 0)
    _, half = _window(canvas)
    ys, xs = np.indices(cov.shape)
    mass = cov.sum()
    return float((cov * (xs + 0.5)).sum() / mass - half), float((cov * (ys + 0.5)).sum() / mass - half)


@lru_cache(maxsize=None)
def min_region_area(canvas: int) -> float:
    """Smallest area a counted region may have: a fraction of a small star's area on this canvas."""
    shape, size = SMALLEST_OBJECT
    areas = [_template(canvas, shape, size, qx, qy).sum() for qx in range(QUARTERS) for qy in range(QUARTERS)]
    return MIN_AREA_FRACTION * float(min(areas))


def _cell_of(cx: float, cy: float, canvas: int) -> int:
    col = min(2, max(0, int(cx * 3 // canvas)))
    row = min(2, max(0, int(cy * 3 // canvas)))
    return 3 * row + col


def _soft_alpha(rgb: np.ndarray, labels: np.ndarray, comp: np.ndarray, color: str,
                background: str | None) -> np.ndarray:
    """Coverage of one region: the fraction of its colour (against the local background) of each pixel
    of the region and of the unlabelled or background pixels around it, 0 elsewhere."""
    alpha = comp.astype(np.float64)
    zone = ndimage.binary_dilation(comp, _EIGHT_CONNECTED, iterations=EDGE_ZONE_PX)
    edge = zone & ~comp & ((labels == _UNLABELLED) | (labels >= _NUM_PALETTE))
    ring = ndimage.binary_dilation(comp, _EIGHT_CONNECTED, iterations=BACKGROUND_RING_PX) & ~comp
    ring_labels = labels[ring]
    bg_counts = Counter(int(v) for v in ring_labels[ring_labels >= _NUM_PALETTE])
    if bg_counts:
        bg_rgb = _LABEL_RGB[bg_counts.most_common(1)[0][0]]
    elif background is not None:
        bg_rgb = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    else:
        alpha[edge] = 0.5  # no reference colour to unmix against: call edge pixels half covered
        return alpha
    unmix = comp | edge
    direction = np.asarray(COLORS[color], dtype=np.float64) - bg_rgb
    frac = (rgb[unmix] - bg_rgb) @ direction / float(direction @ direction)
    alpha[unmix] = np.clip(frac, 0.0, 1.0)
    return alpha


def _fit_template(padded: np.ndarray, pad: int, total_mass: float, canvas: int, shape: str, size: str,
                  centroid: tuple[float, float]) -> tuple[float, float, float]:
    """Best soft IoU of one template near the region, and the fitted bbox centre (iou, cx, cy)."""
    side, half = _window(canvas)
    ox, oy = _centroid_offset(canvas, shape, size)
    cache: dict[tuple[int, int, int], float] = {}

    def iou_at(qx: int, qy: int, blur: int = 0) -> float:
        key = (qx, qy, blur)
        if key not in cache:
            x0, y0 = qx // QUARTERS - half + pad, qy // QUARTERS - half + pad
            win = padded[y0:y0 + side, x0:x0 + side]
            tpl = _template(canvas, shape, size, qx % QUARTERS, qy % QUARTERS, blur)
            inter = np.minimum(win, tpl).sum()
            union = np.maximum(win, tpl).sum() + (total_mass - win.sum())
            cache[key] = float(inter / union) if union > 0 else 0.0
        return cache[key]

    top = canvas * QUARTERS  # the fitted centre stays on the canvas, so windows stay inside the padding

    def clamp(q: int) -> int:
        return min(max(q, 0), top)

    best = (clamp(round((centroid[0] - ox) * QUARTERS)), clamp(round((centroid[1] - oy) * QUARTERS)))
    best_iou = iou_at(*best)
    for step in CLIMB_STEPS:
        for _ in range(MAX_CLIMB_MOVES):
            candidates = [(clamp(best[0] + dx * step), clamp(best[1] + dy * step))
                          for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
            score, pos = max((iou_at(*c), c) for c in candidates)
            if score <= best_iou:
                break
            best_iou, best = score, pos
    # the position is fitted with the sharp template; softer ones then absorb blur in the image
    best_iou = max(iou_at(*best, blur) for blur in range(len(BLUR_LEVELS_PX)))
    return best_iou, best[0] / QUARTERS, best[1] / QUARTERS


def _classify(alpha: np.ndarray) -> tuple[str, str, float, float, float]:
    """Best (shape, size, iou, cx, cy) for a region's soft coverage map."""
    canvas = alpha.shape[0]
    total = float(alpha.sum())
    ys, xs = np.indices(alpha.shape)
    centroid = (float((alpha * (xs + 0.5)).sum() / total), float((alpha * (ys + 0.5)).sum() / total))
    side, _ = _window(canvas)
    pad = side + 2
    padded = np.pad(alpha, pad)
    # IoU <= min(area) / max(area): try the likeliest templates first and skip those that cannot win
    bounds = []
    for shape in SHAPES:
        for size in SIZES:
            mass = float(_template(canvas, shape, size, 0, 0).sum())
            bounds.append((min(mass, total) / max(mass, total), shape, size))
    best = ("", "", -1.0, 0.0, 0.0)
    for bound, shape, size in sorted(bounds, reverse=True):
        if bound <= best[2]:
            break
        iou, cx, cy = _fit_template(padded, pad, total, canvas, shape, size, centroid)
        if iou > best[2]:
            best = (shape, size, iou, cx, cy)
    return best


def analyze(image: ImageLike, tolerance: float = DEFAULT_TOLERANCE) -> tuple[str | None, list[Region]]:
    """Background name (or None) and the counted, classified regions of a square shapes-world image.

    ``image`` is a PIL image or an HxWx3 array with values on the 0..255 scale.
    """
    rgb = _to_rgb_array(image)
    canvas = rgb.shape[0]
    nearest, dist = _nearest(rgb)
    labels = np.where(dist < tolerance, nearest, _UNLABELLED)
    loose = np.where(dist < LOOSE_TOLERANCE_FACTOR * tolerance, nearest, _UNLABELLED)
    bg_counts = [(int((labels == _NUM_PALETTE + i).sum()), name) for i, name in enumerate(BACKGROUNDS)]
    count, name = max(bg_counts)
    background = name if count >= MIN_BACKGROUND_FRACTION * labels.size else None

    min_area = min_region_area(canvas)
    regions: list[Region] = []
    for index, color in enumerate(COLORS):
        components, _ = ndimage.label(loose == index, structure=_EIGHT_CONNECTED)
        for k, slc in enumerate(ndimage.find_objects(components), start=1):
            if slc is None:
                continue
            core = (components[slc] == k) & (labels[slc] == index)
            local = np.pad(core, EROSION_ITERATIONS)
            if not ndimage.binary_erosion(local, _FOUR_CONNECTED, iterations=EROSION_ITERATIONS).any():
                continue
            comp = components == k
            alpha = _soft_alpha(rgb, labels, comp, color, background)
            area = float(alpha.sum())
            if area < min_area:
                continue
            shape, size, iou, cx, cy = _classify(alpha)
            bbox = (slc[1].start, slc[0].start, slc[1].stop, slc[0].stop)
            regions.append(Region(color, shape, size, _cell_of(cx, cy, canvas), area, iou, bbox, (cx, cy)))
    return background, regions


# ------------------------------------------------------------------------------------------------ judging

def _as_attributes(obj: ObjectSpec) -> tuple[str, str, str, int]:
    if isinstance(obj, ShapeObject):
        color, shape, size, cell = obj.color, obj.shape, obj.size, obj.cell
    else:
        try:
            color, shape, size, cell = obj["color"], obj["shape"], obj["size"], obj["cell"]
        except KeyError as err:
            raise ValueError(f"object spec {obj!r} lacks key {err}; needs color, shape, size, cell") from None
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {tuple(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    if not isinstance(cell, (int, np.integer)) or not 0 <= int(cell) < len(CELLS):
        raise ValueError(f"cell must be an integer 0..8, got {cell!r}")
    return color, shape, size, int(cell)


def _describe(attrs: tuple[str, str, str, int]) -> str:
    color, shape, size, cell = attrs
    return f"a {size} {color} {shape} {CELLS[cell]}"


def judge(image: ImageLike, objects: Sequence[ObjectSpec], background: str,
          min_iou: float = DEFAULT_MIN_IOU, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Whether ``image`` shows exactly the requested objects on the requested background.

    Returns {"satisfied": bool, "reason": str ("" when satisfied), "background": detected background,
    "regions": list[Region], "errors": sorted error kinds}. Error kinds: "background"; per missing object, the
    attributes ("color", "shape", "size", "cell") in which the closest leftover region differs from it, or "fit"
    when it differs in none but its template fit is below ``min_iou``; "object_missing" when no region is left
    to pair with; "object_extra" when regions are left over.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    wanted = [_as_attributes(o) for o in objects]
    detected_bg, regions = analyze(image, tolerance)
    problems: list[str] = []
    errors: set[str] = set()
    if detected_bg != background:
        problems.append(f"background is {detected_bg or 'unclear'}, expected {background}")
        errors.add("background")
    unmatched = list(range(len(regions)))
    missing = []
    for attrs in wanted:
        hit = next((i for i in unmatched
                    if (regions[i].color, regions[i].shape, regions[i].size, regions[i].cell) == attrs
                    and regions[i].iou >= min_iou), None)
        if hit is None:
            problems.append(f"missing {_describe(attrs)}")
            missing.append(attrs)
        else:
            unmatched.remove(hit)
    for i in unmatched:
        r = regions[i]
        problems.append(f"unexpected {r.phrase()} (iou {r.iou:.2f})")
    # error kinds: pair each missing object with the leftover region closest to it (fewest attributes wrong);
    # the attributes that differ are the error (a region that matches but fits poorly is "fit")
    left = list(unmatched)
    for attrs in missing:
        if not left:
            errors.add("object_missing")
            continue
        wrong = [[name for name, want, got in zip(ATTRIBUTE_NAMES, attrs, (regions[i].color, regions[i].shape,
                                                                            regions[i].size, regions[i].cell))
                  if want != got] for i in left]
        best = min(range(len(left)), key=lambda j: len(wrong[j]))
        errors.update(wrong[best] or ["fit"])
        left.pop(best)
    if left:
        errors.add("object_extra")
    return {"satisfied": not problems, "reason": "; ".join(problems), "background": detected_bg,
            "regions": regions, "errors": sorted(errors)}


def score(images: Sequence[ImageLike], scenes: Sequence[Scene], min_iou: float = DEFAULT_MIN_IOU,
          tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Fraction of images that satisfy their scene (objects, background), overall and by object count.

    by_objects maps "1", "2", "3" to the fraction satisfied among scenes with that many objects (None when
    there are none); n_by_objects holds the counts; errors counts the failed images showing each error kind
    (``judge``; one image may show several).
    """
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes")
    lo, hi = NUM_OBJECTS_RANGE
    passed = {str(k): 0 for k in range(lo, hi + 1)}
    counts = {str(k): 0 for k in range(lo, hi + 1)}
    errors = {kind: 0 for kind in ERROR_KINDS}
    total = 0
    for image, (objects, background) in zip(images, scenes):
        verdict = judge(image, objects, background, min_iou, tolerance)
        ok = verdict["satisfied"]
        for kind in verdict["errors"]:
            errors[kind] += 1
        key = str(len(objects))
        counts[key] = counts.get(key, 0) + 1
        passed[key] = passed.get(key, 0) + int(ok)
        total += int(ok)
    n = len(images)
    return {"score": total / n if n else 0.0, "n": n,
            "by_objects": {k: (passed[k] / counts[k] if counts[k] else None) for k in counts},
            "n_by_objects": counts, "errors": errors}


# ------------------------------------------------------------------------------------------------ parsing

def _phrase_table(*tables: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """phrase -> canonical name, merged over vocab tables; a phrase may not mean two things."""
    out: dict[str, str] = {}
    for table in tables:
        for name, phrases in table.items():
            for phrase in (name, *phrases):
                if out.setdefault(phrase, name) != name:
                    raise ValueError(f"phrase {phrase!r} is ambiguous: {out[phrase]} or {name}")
    return out


def _words(phrase: str) -> str:
    """Regex for a literal phrase, any run of whitespace between its words."""
    return r"\s+".join(re.escape(word) for word in phrase.split())


def _alternation(phrases: Sequence[str]) -> str:
    """Regex alternation, longest first so that 'at the top left' wins over 'at the top'."""
    return "|".join(_words(p) for p in sorted(phrases, key=len, reverse=True))


def _background_re(template: str) -> re.Pattern[str]:
    """Regex for one background template such as 'over a {} backdrop', the colour in group 'bg'."""
    before, after = (part.strip() for part in template.split("{}"))
    parts = [_words(before)] if before else []
    parts.append(rf"(?P<bg>{_alternation(list(_BG_COLOR_WORDS))})")
    if after:
        parts.append(_words(after))
    body = r"\s+".join(parts)
    return re.compile(rf"(?<![\w-]){body}(?![\w-])")


_SIZE_WORDS = _phrase_table(world._TRAIN_SIZE, world._HELD_SIZE)
_SHAPE_WORDS = _phrase_table(world._TRAIN_SHAPE, world._HELD_SHAPE)
_OBJECT_COLOR_WORDS = _phrase_table({c: world._TRAIN_COLOR.get(c, ()) for c in COLORS},
                                    {c: world._HELD_COLOR.get(c, ()) for c in COLORS})
_BG_COLOR_WORDS = _phrase_table({b: world._TRAIN_COLOR.get(b, ()) for b in BACKGROUNDS},
                                {b: world._HELD_COLOR.get(b, ()) for b in BACKGROUNDS})
_CELL_WORDS = _phrase_table({str(i): (CELLS[i], *world._TRAIN_CELL[i], *world._HELD_CELL[i])
                             for i in range(len(CELLS))})

_OBJECT_RE = re.compile(
    rf"\b(?:a|an)\s+(?P<size>{_alternation(list(_SIZE_WORDS))})"
    rf"\s+(?P<color>{_alternation(list(_OBJECT_COLOR_WORDS))})"
    rf"\s+(?P<shape>{_alternation(list(_SHAPE_WORDS))})"
    rf"\s+(?P<cell>{_alternation(list(_CELL_WORDS))})(?![\w-])")
_BG_TEMPLATES = tuple(dict.fromkeys(("on a {} background", *world._TRAIN_BG, *world._HELD_BG)))
_BG_RES = tuple(_background_re(t) for t in _BG_TEMPLATES)
_EXAMPLE_OBJECT = "a small red circle at the top left"
_EXAMPLE_BACKGROUND = "on a black background"
# what may stand between objects and background: punctuation, the joins and the sentence frames' words
_FILLER_WORDS = {j.strip() for j in (*world._TRAIN_JOIN, *world._HELD_JOIN) if j.strip(" ,;")} | {
    part.strip(" ,").lower() for frame in world._TRAIN_FRAMES for part in re.split(r"\{\w+\}", frame)
    if part.strip(" ,")} | {"and"}
_FILLER_RE = re.compile(rf"^(?:[\s,;.]|\b(?:{_alternation(sorted(_FILLER_WORDS))})\b)*$")


def _normalise(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt.strip().lower())


def parse_prompt(prompt: str) -> tuple[list[ShapeObject], str]:
    """Objects (without centres, in order of mention) and background named by a shapes-world caption.

    Accepts the canonical grammar and the world's training and held-out paraphrases; raises ValueError
    for anything else (unknown words, a missing attribute or background, two objects in one cell).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    text = _normalise(prompt)
    spans: list[tuple[int, int]] = []
    objects: list[ShapeObject] = []
    for m in _OBJECT_RE.finditer(text):
        spans.append(m.span())
        objects.append(ShapeObject(_OBJECT_COLOR_WORDS[m["color"]], _SHAPE_WORDS[m["shape"]],
                                   _SIZE_WORDS[m["size"]], int(_CELL_WORDS[m["cell"]])))
    outside = [(a, b) for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)])]
    bg_hits: list[tuple[int, int, str]] = []
    for a, b in outside:
        for pattern in _BG_RES:
            for m in pattern.finditer(text, a, b):
                bg_hits.append((m.start(), m.end(), _BG_COLOR_WORDS[m["bg"]]))
    # keep the longest of overlapping background matches ("set on plain black" over "on plain"...)
    bg_hits.sort(key=lambda h: (h[0], -(h[1] - h[0])))
    chosen: list[tuple[int, int, str]] = []
    for hit in bg_hits:
        if not chosen or hit[0] >= chosen[-1][1]:
            chosen.append(hit)
        elif hit[1] - hit[0] > chosen[-1][1] - chosen[-1][0]:
            chosen[-1] = hit
    spans += [(a, b) for a, b, _ in chosen]
    spans.sort()
    cursor = 0
    for a, b in spans + [(len(text), len(text))]:
        leftover = text[cursor:a]
        if not _FILLER_RE.match(leftover):
            raise ValueError(f"cannot parse {leftover.strip()!r} in prompt {prompt!r}; expected objects "
                             f"like {_EXAMPLE_OBJECT!r} and a background like {_EXAMPLE_BACKGROUND!r}")
        cursor = max(cursor, b)
    if not objects:
        raise ValueError(f"no object mention found in prompt {prompt!r}")
    lo, hi = NUM_OBJECTS_RANGE
    if not lo <= len(objects) <= hi:
        raise ValueError(f"prompt {prompt!r} names {len(objects)} objects; the shapes world has {lo} to {hi}")
    if len({o.cell for o in objects}) != len(objects):
        raise ValueError(f"prompt {prompt!r} puts two objects in the same cell")
    if not chosen:
        raise ValueError(f"no background phrase found in prompt {prompt!r}")
    if len({bg for _, _, bg in chosen}) != 1:
        raise ValueError(f"prompt {prompt!r} names more than one background")
    return objects, chosen[0][2]


# ------------------------------------------------------------------------------------------------ ceiling

CAPTION_STYLES = ("attributes", "canonical", "paraphrase", "held_out")


def ceiling(n: int = 300, seed: int = DEFAULT_CEILING_SEED, size: int = 64,
            captions: str = "attributes", min_iou: float = DEFAULT_MIN_IOU) -> dict[str, Any]:
    """Score of the judge on the world's own renders (the best any generator can reach).

    ``captions="attributes"`` judges each render against the attributes it was drawn from (canonical
    captions); "canonical", "paraphrase" and "held_out" instead judge it against ``parse_prompt`` of its
    caption in that style, testing the parser end to end.
    """
    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions must be one of {CAPTION_STYLES}, got {captions!r}")
    samples = list(world.generate(n, seed, size=size, paraphrase=captions == "paraphrase",
                                  held_out=captions == "held_out"))
    if captions == "attributes":
        scenes: list[Scene] = [(s.objects, s.background) for s in samples]
    else:
        scenes = [parse_prompt(s.caption) for s in samples]
    return score([s.image for s in samples], scenes, min_iou=min_iou)


__all__ = ["Region", "analyze", "judge", "score", "parse_prompt", "ceiling", "label_pixels",
           "min_region_area", "CAPTION_STYLES", "DEFAULT_TOLERANCE", "DEFAULT_MIN_IOU"]
