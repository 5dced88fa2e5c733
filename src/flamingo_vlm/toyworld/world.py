"""The toy world: scenes of coloured shapes, rendered with PIL, and short videos of them moving.

Everything is drawn from a ``random.Random`` the caller seeds, so the same seed gives the same world.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "diamond": "diamonds", "cross": "crosses"}
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (45, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 50, 185),
    "orange": (245, 135, 25),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "middle")
COUNTS = ("one", "two", "three")
MOTIONS = ("left", "right", "up", "down")
# Backgrounds: greys and muted tones that no object colour is close to.
BACKGROUNDS = ((235, 235, 235), (200, 200, 200), (120, 120, 120), (60, 60, 60), (225, 215, 195), (190, 205, 215))
IMAGE_SIZE = 64
_RADIUS = {"small": (8, 10), "large": (14, 17)}
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "middle": (0.5, 0.5)}


@dataclass(frozen=True)
class Scene:
    """One image: ``count`` copies of one shape/colour/size; a position when there is a single object."""

    shape: str
    colour: str
    size: str
    count: int
    position: str | None
    background: int
    layout_seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def count_word(self) -> str:
        return COUNTS[self.count - 1]


@dataclass(frozen=True)
class VideoScene:
    """One video: a single shape that moves in one direction over the frames."""

    shape: str
    colour: str
    size: str
    motion: str
    background: int
    layout_seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(rng: random.Random, *, shape: str | None = None, colour: str | None = None, count: int | None = None) -> Scene:
    count = count or rng.choice((1, 1, 1, 2, 3))
    return Scene(
        shape=shape or rng.choice(SHAPES),
        colour=colour or rng.choice(tuple(COLOURS)),
        size=rng.choice(SIZES),
        count=count,
        position=rng.choice(POSITIONS) if count == 1 else None,
        background=rng.randrange(len(BACKGROUNDS)),
        layout_seed=rng.randrange(2**31),
    )


def sample_video_scene(rng: random.Random) -> VideoScene:
    return VideoScene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(tuple(COLOURS)),
        size=rng.choice(SIZES),
        motion=rng.choice(MOTIONS),
        background=rng.randrange(len(BACKGROUNDS)),
        layout_seed=rng.randrange(2**31),
    )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return [
            (cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
             cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    if shape == "cross":
        w = 0.35 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
                (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _background(index: int, rng: random.Random, size: int) -> Image.Image:
    base = BACKGROUNDS[index]
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(12):  # faint speckles so backgrounds are not flat
        x, y = rng.randrange(size), rng.randrange(size)
        d = rng.randint(-18, 18)
        draw.point((x, y), fill=tuple(max(0, min(255, c + d)) for c in base))
    return img


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    rng = random.Random(scene.layout_seed)
    img = _background(scene.background, rng, size)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(*_RADIUS[scene.size]) * size / IMAGE_SIZE
    if scene.count == 1:
        fx, fy = _CENTRES[scene.position]
        centres = [(fx * size + rng.uniform(-3, 3), fy * size + rng.uniform(-3, 3))]
    else:
        centres = []
        for _ in range(200):  # rejection sampling: non-overlapping copies inside the frame
            c = (rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1))
            if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 > (2.1 * r) ** 2 for o in centres):
                centres.append(c)
            if len(centres) == scene.count:
                break
        if len(centres) < scene.count:
            r *= 0.6
            centres = [(size * (k + 1) / (scene.count + 1), size / 2) for k in range(scene.count)]
    for cx, cy in centres:
        draw_shape(draw, scene.shape, scene.colour, cx, cy, r)
    return img


def render_video(video: VideoScene, num_frames: int = 8, size: int = IMAGE_SIZE) -> list[Image.Image]:
    """Frames of the shape moving across the frame in ``video.motion``'s direction."""
    rng = random.Random(video.layout_seed)
    r = rng.uniform(*_RADIUS[video.size]) * size / IMAGE_SIZE
    margin = r + 2
    other = rng.uniform(margin, size - margin)
    start, end = margin, size - margin
    if video.motion in ("left", "up"):
        start, end = end, start
    background = _background(video.background, rng, size)
    frames = []
    for t in range(num_frames):
        pos = start + (end - start) * t / max(num_frames - 1, 1)
        cx, cy = (pos, other) if video.motion in ("left", "right") else (other, pos)
        img = background.copy()
        draw_shape(ImageDraw.Draw(img), video.shape, video.colour, cx, cy, r)
        frames.append(img)
    return frames
