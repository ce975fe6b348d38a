"""A procedural text-to-image data set: 10 shape classes in CIFAR-10's role, with styles.

No download, deterministic by seed: example ``i`` of seed ``s`` depends on (s, i) only, so any
slice of the stream can be regenerated. Each class has three synonyms (the paper's synonym lists
for CIFAR-10 play the same role) and every image has one of a few rendering styles that prompts
can name, so object, synonym and style erasure (and object+style combinations) can be measured.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x, y) in object coordinates -> inside?


def _polygon(vertices: np.ndarray) -> Mask:
    """Even-odd rule point-in-polygon, vectorised over a grid."""
    vx, vy = vertices[:, 0], vertices[:, 1]

    def inside(x, y):
        result = np.zeros(x.shape, bool)
        for i in range(len(vertices)):
            j = i - 1
            crosses = (vy[i] > y) != (vy[j] > y)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = (vx[j] - vx[i]) * (y - vy[i]) / (vy[j] - vy[i]) + vx[i]
            result ^= crosses & (x < x_at)
        return result

    return inside


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


SHAPES: dict[str, Mask] = {
    "circle": lambda x, y: x**2 + y**2 < 0.9,
    "square": lambda x, y: np.maximum(np.abs(x), np.abs(y)) < 0.75,
    "triangle": _polygon(np.array([[0.0, 0.95], [-0.9, -0.65], [0.9, -0.65]])),
    "star": _polygon(_star()),
    "cross": lambda x, y: ((np.abs(x) < 0.3) & (np.abs(y) < 0.95)) | ((np.abs(y) < 0.3) & (np.abs(x) < 0.95)),
    "heart": lambda x, y: ((1.2 * x) ** 2 + (1.2 * y + 0.25) ** 2 - 1) ** 3 - (1.2 * x) ** 2 * (1.2 * y + 0.25) ** 3 < 0,
    "crescent": lambda x, y: (x**2 + y**2 < 0.9) & ((x - 0.45) ** 2 + (y - 0.2) ** 2 > 0.55),
    "arrow": _polygon(np.array([[-0.95, 0.22], [0.15, 0.22], [0.15, 0.6], [0.95, 0.0], [0.15, -0.6], [0.15, -0.22], [-0.95, -0.22]])),
    "ring": lambda x, y: (x**2 + y**2 < 0.9) & (x**2 + y**2 > 0.12),  # a thick band: an outlined circle is thin
    "diamond": lambda x, y: np.abs(x) / 0.65 + np.abs(y) < 0.95,
}

SYNONYMS: dict[str, tuple[str, str, str]] = {
    "circle": ("disk", "orb", "round blob"),
    "square": ("box", "block", "quadrate"),
    "triangle": ("pyramid", "wedge", "trigon"),
    "star": ("pentagram", "starburst", "sparkle"),
    "cross": ("plus sign", "crucifix", "intersection mark"),
    "heart": ("valentine", "love symbol", "cardioid"),
    "crescent": ("moon", "sickle", "half moon"),
    "arrow": ("pointer", "dart", "direction sign"),
    "ring": ("donut", "hoop", "loop"),
    "diamond": ("rhombus", "lozenge", "gem"),
}

CLASSES: tuple[str, ...] = tuple(SHAPES)
STYLES: tuple[str, ...] = ("solid", "striped", "dotted", "outlined")
TEMPLATES = ("a photo of the {}", "a photo of a {}", "a picture of the {}", "an image of a {}", "a {}")


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray  # uint8 (size, size, 3)
    caption: str
    label: int  # index into CLASSES
    style: int  # index into STYLES
    name_used: str  # the class word in the caption (the class name or a synonym)


def class_named_in(prompt: str) -> int | None:
    """The class a prompt names (by its name or a synonym, whole words, longest match first), or None."""
    text = prompt.lower()
    words = sorted(((w, i) for i, c in enumerate(CLASSES) for w in (c, *SYNONYMS[c])), key=lambda p: -len(p[0]))
    for word, index in words:
        if re.search(rf"\b{re.escape(word)}\b", text):
            return index
    return None


def caption_for(rng: np.random.Generator, cls: str, style: str, synonym_prob: float = 0.3,
                style_prob: float = 0.5) -> tuple[str, str]:
    name = rng.choice(SYNONYMS[cls]) if rng.random() < synonym_prob else cls
    noun = f"{style} {name}" if rng.random() < style_prob else name
    return article_fix(str(rng.choice(TEMPLATES)).format(noun)), str(name)


def article_fix(caption: str) -> str:
    """'a' before a vowel becomes 'an'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and object colours far enough apart to stay visible."""
    while True:
        background, colour = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.abs(background - colour).sum() > 0.9:
            return background, colour


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)² square; outside the image counts as background."""
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=False)
    out = mask.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


@dataclasses.dataclass(frozen=True)
class Layout:
    """How widely size, position and rotation vary (colours and backgrounds always vary fully)."""

    scale: tuple[float, float] = (0.5, 0.8)  # half-width of the shape, as a fraction of the image's
    offset: float | None = None              # max |centre| coordinate; None: anywhere the shape fits
    rotation: float = np.pi                  # max |angle| (radians); pi: any rotation


# "wide" trains the evaluator and the VAE: they must handle whatever a model draws. "centred" is the
# text-to-image training set: roughly centred, upright within 45 degrees, so that the class decides
# most of an image and a small model learns its prompt quickly.
LAYOUTS = {"wide": Layout(), "centred": Layout(scale=(0.6, 0.85), offset=0.12, rotation=np.pi / 4)}


def render(rng: np.random.Generator, cls: str, style: str, size: int = 32, supersample: int = 2,
           layout: Layout = LAYOUTS["wide"]) -> np.ndarray:
    """Draw one shape with random colour, size, position, rotation and background."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n * 2 - 1  # [-1, 1]
    gx, gy = np.meshgrid(coords, -coords)
    scale = rng.uniform(*layout.scale)
    reach = 1 - scale if layout.offset is None else min(layout.offset, 1 - scale)
    cx, cy = rng.uniform(-reach, reach, 2)
    # The same number of draws for every layout, so a seed's stream stays aligned.
    angle = rng.uniform(0, 2 * np.pi) if layout.rotation >= np.pi else rng.uniform(-layout.rotation, layout.rotation)
    c, s = np.cos(angle), np.sin(angle)
    x = (c * (gx - cx) + s * (gy - cy)) / scale  # object coordinates: rotated, centred, unit size
    y = (-s * (gx - cx) + c * (gy - cy)) / scale
    shape = SHAPES[cls]
    inside = shape(x, y)
    if style == "outlined":
        # Erosion, not a shrunken copy: a shrunken ring or crescent is not the inside of its outline.
        inside &= ~_erode(inside, max(1, round(0.18 * scale * n / 2)))
    elif style == "striped":
        inside &= np.sin(x * 2.2 * np.pi / 0.45) > -0.2
    elif style == "dotted":
        inside &= (np.mod(x, 0.3) - 0.15) ** 2 + (np.mod(y, 0.3) - 0.15) ** 2 < 0.01
    background, colour = _colour_pair(rng)
    shade = 1 + 0.15 * (gy[..., None] * rng.uniform(-1, 1))  # a mild gradient on the background
    image = np.where(inside[..., None], colour, np.clip(background * shade, 0, 1))
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # anti-aliasing
    return np.round(image * 255).astype(np.uint8)


def example(seed: int, index: int, size: int = 32, synonym_prob: float = 0.3, layout: str = "wide") -> Example:
    """Example ``index`` of the stream ``seed``: depends on (seed, index, layout) alone."""
    rng = np.random.default_rng([seed, index])
    label, style = int(rng.integers(len(CLASSES))), int(rng.integers(len(STYLES)))  # label_of repeats the first draw
    caption, name = caption_for(rng, CLASSES[label], STYLES[style], synonym_prob)
    return Example(render(rng, CLASSES[label], STYLES[style], size, layout=LAYOUTS[layout]), caption, label, style, name)


def label_of(seed: int, index: int) -> int:
    """The class of example ``index`` of the stream ``seed``, without drawing it."""
    return int(np.random.default_rng([seed, index]).integers(len(CLASSES)))


def class_weight_vector(class_weights: dict[str, float]) -> np.ndarray:
    """Each class's weight in CLASSES order (1 where not named); unknown names or weights <= 0 are an error."""
    unknown = sorted(set(class_weights) - set(CLASSES))
    if unknown:
        raise ValueError(f"class_weights names unknown classes {unknown}; known: {list(CLASSES)}")
    weights = np.array([float(class_weights.get(c, 1.0)) for c in CLASSES])
    if not np.all(weights > 0):
        raise ValueError(f"class_weights must be positive, got {dict(class_weights)}")
    return weights


def indices_for_class_weights(seed: int, count: int, class_weights: dict[str, float]) -> np.ndarray:
    """``count`` example indices of the stream ``seed`` whose classes come in proportion to
    ``class_weights`` (classes not named weigh 1): for each class, its first examples in the stream."""
    weights = class_weight_vector(class_weights)
    exact = count * weights / weights.sum()
    quotas = np.floor(exact).astype(int)
    quotas[np.argsort(quotas - exact)[:count - quotas.sum()]] += 1  # largest remainders take the rest
    taken, index = [], 0
    while quotas.any():
        label = label_of(seed, index)
        if quotas[label]:
            quotas[label] -= 1
            taken.append(index)
        index += 1
    return np.array(taken)


def batch(seed: int, start: int, count: int, size: int = 32, synonym_prob: float = 0.3, layout: str = "wide"):
    """Examples ``start .. start+count-1`` as arrays: images (N, size, size, 3) uint8, captions, labels, styles."""
    return batch_at(seed, range(start, start + count), size, synonym_prob, layout)


def batch_at(seed: int, indices, size: int = 32, synonym_prob: float = 0.3, layout: str = "wide"):
    """The examples at ``indices`` of the stream ``seed``, as arrays like ``batch``'s."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    items = [example(seed, int(i), size, synonym_prob, layout) for i in indices]
    return (np.stack([e.image for e in items]), [e.caption for e in items],
            np.array([e.label for e in items]), np.array([e.style for e in items]))
