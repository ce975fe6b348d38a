"""The embedded shapes model's concept files (``configs/concepts/shapes-*.json``), generated from the data set's
classes, styles, synonyms and caption templates (``unguide_jax.shapes.data``); ``python -m
unguide_jax.cli.concepts --write-shapes`` rewrites them."""
from __future__ import annotations

import json
import re
from pathlib import Path

from unguide_jax.erasers.concepts import Concept, concepts_dir
from unguide_jax.shapes.data import CLASSES, STYLES, SYNONYMS, TEMPLATES


def _photo(noun: str) -> str:
    return f"a photo of the {noun}"


# The anchor every shapes concept turns into (the training objective's reference prompt). The paper anchors
# on scenes outside the evaluated classes; this model knows no scenes, only shapes, and every image it draws
# is one. Neutral here means: the base model's images of the anchor spread over the ten classes with none
# dominant, and the erasure LoRA leaves it nearly as it is (docs/results.md, "Neutral anchors"). Of the
# scene words tried, "forest" draws stars (77 %) and "street" rings (94 %); "sky" spreads widest (no class
# above 39 %, normalised entropy 0.70). "" spreads wider still (23 %, 0.90) but is ESD's anchor, not
# UnGuide's; it stays available in a concept file.
SHAPES_ANCHOR = "sky"


def shape_anchor(cls: str) -> str:
    """The anchor of a shapes class: the same neutral scene for every class (``SHAPES_ANCHOR``)."""
    return SHAPES_ANCHOR


# Erasing "solid" has no neutral style to fall back on; outlined (no fill) is its opposite.
_STYLE_REFERENCE = {"solid": "outlined"}


# Prompts that evoke each shape without its name or synonyms (leakage evaluation). The shapes model
# learnt only class names and synonyms, so these test what its text encoder makes of other words.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "circle": ("a photo of a perfectly round shape", "a picture of a shape with no corners", "a round coin shape"),
    "square": ("a photo of a shape with four equal sides", "a picture of a four cornered shape", "a tile shape"),
    "triangle": ("a photo of a shape with three corners", "a picture of a three sided shape", "a slice of pizza shape"),
    "star": ("a photo of a five pointed shape", "a picture of a twinkling night sky shape", "a sheriff badge shape"),
    "cross": ("a photo of two crossing bars", "a picture of a first aid symbol", "a swiss flag shape"),
    "heart": ("a photo of a romantic symbol", "a picture of a shape meaning love", "a symbol on a playing card"),
    "crescent": ("a photo of a lunar shape", "a picture of a curved night sky shape", "a banana like curve"),
    "arrow": ("a photo of a shape pointing one way", "a picture of a road direction shape", "a shape like a cursor"),
    "ring": ("a photo of a round shape with a hole", "a picture of a wedding band shape", "a tyre shape"),
    "diamond": ("a photo of a shape standing on one corner", "a picture of a kite shaped figure", "a shape like a jewel"),
}


def shapes_concepts() -> list[Concept]:
    def phrasings(noun):
        return tuple(re.sub(r"\ba (?=[aeiou])", "an ", t.format(noun)) for t in TEMPLATES)

    concepts = []
    for cls in CLASSES:
        concepts.append(Concept(
            name=f"shapes-{cls}", kind="object",
            targets=(_photo(cls),), references=(_photo(shape_anchor(cls)),),
            synonyms=tuple(_photo(s) for s in SYNONYMS[cls]),
            other=tuple(_photo(c) for c in CLASSES if c != cls) + ("",),
            # The class name in every caption template; synonyms stay unseen, so Acc_g measures generalisation.
            forget=phrasings(cls),
            retain=tuple(p for c in CLASSES if c != cls for p in phrasings(c)),
            paraphrases=PARAPHRASES[cls],
        ))
    for style in STYLES:
        ref_style = _STYLE_REFERENCE.get(style, "solid")
        concepts.append(Concept(
            name=f"shapes-style-{style}", kind="style",
            targets=tuple(_photo(f"{style} {c}") for c in CLASSES),
            references=tuple(_photo(f"{ref_style} {c}") for c in CLASSES),
            # The style on class synonyms: does the erasure follow the style, not the class words?
            synonyms=tuple(_photo(f"{style} {SYNONYMS[c][0]}") for c in CLASSES[:3]),
            other=tuple(_photo(f"{s} {c}") for s in STYLES if s != style for c in CLASSES) + ("",),
        ))
    return concepts


def render_concept(concept: Concept) -> str:
    return json.dumps(concept.to_json(), indent=2) + "\n"


def write_shapes(directory: Path | None = None) -> list[Path]:
    directory = Path(directory or concepts_dir())
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for concept in shapes_concepts():
        path = directory / f"{concept.name}.json"
        path.write_text(render_concept(concept))
        written.append(path)
    return written
