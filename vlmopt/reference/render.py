"""Drawing for the synthetic tasks: cluttered low-saturation backgrounds and small saturated shapes.

Every function takes a ``numpy.random.Generator`` and is deterministic given its state. Images are
uint8 arrays [H, W, 3]; label masks are uint8 [H, W] (0 = background, k = object k-1).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOUR_HUES = {"red": 0.0, "orange": 27.0, "yellow": 55.0, "green": 125.0, "blue": 222.0, "purple": 282.0}
"""Object colours (hue in degrees). Objects are saturated; everything else is kept below saturation 0.25."""
COLOURS = tuple(COLOUR_HUES)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")


@dataclass(frozen=True)
class Obj:
    """One object as drawn in one image or frame (pixel units)."""

    shape: str
    """One of :data:`SHAPES`."""
    colour: str
    """One of :data:`COLOURS`."""
    cx: float
    """Centre x (pixels, from the left)."""
    cy: float
    """Centre y (pixels, from the top)."""
    r: float
    """Radius of the circumscribed circle (pixels)."""
    rot: float = 0.0
    """Rotation (degrees, small: a square never turns into a diamond)."""
    track: int = -1
    """Identity of the object across video frames (-1 in still images)."""

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Bounding box ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive."""
        pts = np.asarray(polygon(self))
        x0, y0 = np.floor(pts.min(0)).astype(int)
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
        return int(x0), int(y0), int(x1), int(y1)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32)


def object_rgb(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    """A jittered saturated RGB for ``colour`` (hue ±5°, saturation 0.8–1, value 0.8–1)."""
    hue = COLOUR_HUES[colour] + rng.uniform(-5, 5)
    value = rng.uniform(0.85, 1.0) if colour == "yellow" else rng.uniform(0.78, 1.0)
    rgb = _hsv(hue, rng.uniform(0.8, 1.0), value)
    return tuple(int(round(c * 255)) for c in rgb)


def polygon(obj: Obj) -> list[tuple[float, float]]:
    """Vertices of ``obj`` (circles as 32-gons, so drawing and masks agree)."""
    r, rot = obj.r, math.radians(obj.rot)
    if obj.shape == "circle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    elif obj.shape == "square":
        a = 0.78 * r
        pts = [(-a, -a), (a, -a), (a, a), (-a, a)]
    elif obj.shape == "diamond":
        pts = [(0, -r), (0.8 * r, 0), (0, r), (-0.8 * r, 0)]
    elif obj.shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + 0.15 * r) for x, y in pts]
    elif obj.shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif obj.shape == "cross":
        w = 0.3 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    c, s = math.cos(rot), math.sin(rot)
    return [(obj.cx + x * c - y * s, obj.cy + x * s + y * c) for x, y in pts]


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluttered low-saturation background, float32 [H, W, 3] in [0, 1].

    Smooth value noise, optional stripes, translucent blobs and thin clutter (lines, small boxes),
    all with saturation < 0.25 so no background pixel looks like an object colour.
    """
    side = max(height, width)
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.15), rng.uniform(0.35, 0.75))
    img = np.broadcast_to(base, (height, width, 3)).copy()

    grid = int(rng.integers(3, 9))
    coarse = rng.normal(0, 1, (grid, grid)).astype(np.float32)
    coarse = (coarse - coarse.min()) / (np.ptp(coarse) + 1e-6)
    smooth = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR), dtype=np.float32) / 255
    img += (smooth[..., None] - 0.5) * rng.uniform(0.1, 0.3)

    if rng.random() < 0.6:
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.03, 0.1) * side
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform(0, 6.3))
        img += wave[..., None] * rng.uniform(0.03, 0.09) * _hsv(rng.uniform(0, 360), rng.uniform(0, 0.2), 1.0)

    canvas = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(4, 12))):
        rx, ry = rng.uniform(0.04, 0.2, size=2) * side
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rgb = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.2, 0.95))
        fill = tuple(int(c * 255) for c in rgb) + (int(rng.uniform(50, 150)),)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")

    draw = ImageDraw.Draw(canvas)
    line_width = max(1, round(side / 150))
    for _ in range(int(rng.integers(8, 25))):
        rgb = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.2), rng.uniform(0.1, 1.0))
        fill = tuple(int(c * 255) for c in rgb)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.6:
            dx, dy = rng.normal(0, 0.12 * side, size=2)
            draw.line([x, y, x + dx, y + dy], fill=fill, width=line_width)
        else:
            w, h = rng.uniform(0.01, 0.04, size=2) * side
            draw.rectangle([x, y, x + w, y + h], fill=fill)
    out = np.asarray(canvas, dtype=np.float32) / 255
    return out


def add_noise(rng: np.random.Generator, img: np.ndarray, sigma: tuple[float, float] = (0.01, 0.035)) -> np.ndarray:
    """``img`` (float [H, W, 3]) plus Gaussian pixel noise, as uint8."""
    noisy = img + rng.normal(0, rng.uniform(*sigma), img.shape).astype(np.float32)
    return np.clip(noisy * 255 + 0.5, 0, 255).astype(np.uint8)


def draw_objects(
    rng: np.random.Generator, canvas: np.ndarray, objects: list[Obj], rgbs: list[tuple[int, int, int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``objects`` drawn on a float [H, W, 3] canvas; returns (float image, uint8 label mask [H, W]).

    ``rgbs`` fixes each object's exact colour (video tracks keep theirs); default: fresh jitter.
    """
    height, width = canvas.shape[:2]
    image = Image.fromarray(np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8))
    mask = Image.new("L", (width, height), 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for k, obj in enumerate(objects):
        pts = polygon(obj)
        draw.polygon(pts, fill=rgbs[k] if rgbs is not None else object_rgb(rng, obj.colour))
        draw_mask.polygon(pts, fill=k + 1)
    return np.asarray(image, dtype=np.float32) / 255, np.asarray(mask, dtype=np.uint8)


def place(
    rng: np.random.Generator,
    size: int,
    radius: tuple[float, float],
    placed: list[tuple[float, float, float]],
    region: tuple[float, float, float, float] | None = None,
    tries: int = 200,
    grid: float = 0.0,
    offset: float = 0.0,
    jitter: float = 0.0,
) -> tuple[float, float, float] | None:
    """A free spot ``(cx, cy, r)`` for a new object: inside the image (or ``region`` =
    (x0, y0, x1, y1) for its centre, pixels), not touching ``placed`` circles; None if none found.

    ``grid`` > 0 snaps the centre to ``offset + k * grid`` (then ± ``jitter`` px): with the grid of
    a model's patches an object always covers the same block of tokens, each seeing the same part
    of the shape, which a small ViT trained from scratch learns far faster than free placement.
    """
    for _ in range(tries):
        r = rng.uniform(*radius) * size
        lo, hi = r + 1, size - r - 1
        x0, y0, x1, y1 = region if region is not None else (lo, lo, hi, hi)
        x0, y0, x1, y1 = max(x0, lo), max(y0, lo), min(x1, hi), min(y1, hi)
        if x0 >= x1 or y0 >= y1:
            return None
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if grid:
            cx = offset + grid * round((cx - offset) / grid) + rng.uniform(-jitter, jitter)
            cy = offset + grid * round((cy - offset) / grid) + rng.uniform(-jitter, jitter)
            if not (x0 - grid / 2 <= cx <= x1 + grid / 2 and y0 - grid / 2 <= cy <= y1 + grid / 2 and lo <= cx <= hi and lo <= cy <= hi):
                continue
        if all(math.hypot(cx - px, cy - py) > r + pr + 0.02 * size for px, py, pr in placed):
            return cx, cy, r
    return None
