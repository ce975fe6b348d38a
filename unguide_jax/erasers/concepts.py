"""Concept files: what to erase (target prompts), what it should turn into (reference prompts), and
the prompts that judge the erasure (synonyms, other). Spec unguide.md §1.

A concept file is JSON with exactly the fields of ``Concept``; ``targets``/``references`` (and the
other lists) may be given as one string. Shipped files live in ``configs/concepts/<name>.json`` at
the repository root, installed as package data (``unguide_jax.configs``, see
``unguide_jax.resources``): ``concepts_dir`` finds them in an editable install and in a wheel
alike, unless ``$UNGUIDE_CONCEPTS_DIR`` names another folder.

The shapes-model files are generated from ``unguide_jax.shapes.data`` (in an editable install the
shipped folder is the repository's ``configs/concepts``):
    python -m unguide_jax.erasers.concepts --write-shapes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

from unguide_jax.resources import packaged_concepts
from unguide_jax.shapes.data import CLASSES, STYLES, SYNONYMS, TEMPLATES

KINDS = ("object", "style", "explicit")


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    targets: tuple[str, ...]
    # The anchors: what each target should turn into. UnGuide's objective pushes ε(target) to ε(anchor) −
    # γ (ε(target) − ε(anchor)), and the LoRA's collateral damage lands on whatever the anchor draws, so an
    # anchor is a neutral prompt outside the evaluated classes (the paper: scenes, "a photo of the forest");
    # "" gives ESD's anchor. Same length as targets, or one reference used for every target.
    references: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    other: tuple[str, ...] = ()
    kind: str = "object"
    # Closed-form erasers (PURE, UCE): anchors to erase and to keep. Empty: the targets, and the
    # non-empty "other" prompts. Evaluation only: prompts that evoke the concept without naming it.
    forget: tuple[str, ...] = ()
    retain: tuple[str, ...] = ()
    paraphrases: tuple[str, ...] = ()

    def __post_init__(self):
        for field in ("targets", "references", "synonyms", "other", "forget", "retain", "paraphrases"):
            value = getattr(self, field)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            if not all(isinstance(p, str) for p in value):
                raise TypeError(f"concept {self.name!r}: {field} must be strings, got {value!r}")
            object.__setattr__(self, field, value)
        if not self.targets:
            raise ValueError(f"concept {self.name!r} has no target prompt")
        if len(self.references) not in (1, len(self.targets)):
            raise ValueError(f"concept {self.name!r}: {len(self.references)} references for {len(self.targets)} "
                             "targets (give one reference, or one per target)")
        if self.kind not in KINDS:
            raise ValueError(f"concept {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(target, reference) pairs, the single reference broadcast over all targets."""
        refs = self.references * len(self.targets) if len(self.references) == 1 else self.references
        return list(zip(self.targets, refs))

    @property
    def forget_anchors(self) -> tuple[str, ...]:
        return self.forget or self.targets

    @property
    def retain_anchors(self) -> tuple[str, ...]:
        return self.retain or tuple(p for p in self.other if p)

    def to_json(self) -> dict:
        out = {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
               for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v or k not in ("forget", "retain", "paraphrases")}


def concepts_dir() -> Path:
    """The folder of the shipped concept files, or ``$UNGUIDE_CONCEPTS_DIR`` when set."""
    override = os.environ.get("UNGUIDE_CONCEPTS_DIR")
    if override:
        return Path(override)
    return packaged_concepts()


def concept_from_dict(raw: dict, source: str = "concept") -> Concept:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a concept must be a JSON object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(Concept)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}; known fields are {sorted(known)}")
    missing = sorted({"name", "targets", "references"} - set(raw))
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
    return Concept(**raw)


def load_concept(path_or_name: str | Path) -> Concept:
    """A concept from a JSON file, or from a bare name: the shipped ``configs/concepts/<name>.json``."""
    text = str(path_or_name)
    path = Path(text)
    if not (text.endswith(".json") or os.sep in text or path.exists()):
        path = concepts_dir() / f"{text}.json"
        if not path.exists():
            raise FileNotFoundError(f"no concept named {text!r} in {concepts_dir()}; known: {list_concepts()}")
    if not path.exists():
        raise FileNotFoundError(f"concept file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"concept file {path} is not valid JSON: {err}") from None
    return concept_from_dict(raw, source=str(path))


def list_concepts() -> list[str]:
    directory = concepts_dir()
    return sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []


# --- the embedded shapes model's concept files ------------------------------------------------

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-shapes", action="store_true", help="(re)write configs/concepts/shapes-*.json")
    parser.add_argument("--dir", type=Path, default=None, help="output folder (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.write_shapes:
        for path in write_shapes(args.dir):
            print(path)
    else:
        for name in list_concepts():
            print(name)


if __name__ == "__main__":
    main()
