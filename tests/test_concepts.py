"""Concept files : shipped files load, bad files are named, shapes files are current."""
import json

import pytest

from unguide_jax.erasers.concepts import (
    Concept,
    concepts_dir,
    list_concepts,
    load_concept,
)
from unguide_jax.shapes import data as shapes_data
from unguide_jax.shapes.concepts import render_concept, shape_anchor, shapes_concepts
from unguide_jax.shapes.data import CLASSES, STYLES, SYNONYMS

CIFAR10_ANCHORS = dict(airplane="street", automobile="sea", bird="ground", cat="forest", deer="sea", dog="forest",
                       frog="sky", horse="forest", ship="sky", truck="sky")


def test_every_shipped_concept_loads_by_name():
    names = list_concepts()
    assert set(CIFAR10_ANCHORS) | {"nudity"} <= set(names)
    for name in names:
        concept = load_concept(name)
        assert concept.name == name
        assert all(len(pair) == 2 for pair in concept.pairs)


@pytest.mark.parametrize("cls, anchor", CIFAR10_ANCHORS.items())
def test_cifar10_concepts_use_the_papers_anchors(cls, anchor):
    concept = load_concept(cls)
    assert concept.pairs == [(f"a photo of the {cls}", f"a photo of the {anchor}")]
    assert len(concept.synonyms) == 3 and concept.kind == "object"
    assert concept.other == tuple(f"a photo of the {c}" for c in CIFAR10_ANCHORS if c != cls) + ("",)


def test_nudity_concept():
    concept = load_concept("nudity")
    assert concept.kind == "explicit"
    assert concept.pairs == [("a photo of a nude person", "a photo of a person wearing clothes")]


def test_shapes_files_are_up_to_date():
    """Regenerate with: python -m unguide_jax.cli.concepts --write-shapes"""
    for concept in shapes_concepts():
        path = concepts_dir() / f"{concept.name}.json"
        assert path.exists(), f"{path} is missing: run python -m unguide_jax.cli.concepts --write-shapes"
        assert path.read_text() == render_concept(concept), (
            f"{path} is stale: run python -m unguide_jax.cli.concepts --write-shapes")


def test_shapes_concepts_follow_the_data_set():
    anchors = {shape_anchor(c) for c in CLASSES}
    assert not anchors & set(CLASSES) and all(shapes_data.class_named_in(f"a photo of the {a}") is None for a in anchors)
    circle = load_concept("shapes-circle")
    assert circle.pairs == [("a photo of the circle", f"a photo of the {shape_anchor('circle')}")]
    assert circle.synonyms == tuple(f"a photo of the {s}" for s in SYNONYMS["circle"])
    assert len(circle.other) == 10 and circle.other[-1] == "" and "a photo of the circle" not in circle.other
    for style in STYLES:
        concept = load_concept(f"shapes-style-{style}")
        assert concept.kind == "style" and len(concept.pairs) == len(CLASSES)
        assert all(t.startswith(f"a photo of the {style} ") and style not in r for t, r in concept.pairs)
    assert load_concept("shapes-style-striped").pairs[0] == ("a photo of the striped circle",
                                                             "a photo of the solid circle")


def test_unknown_fields_and_bad_values_are_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(dict(name="x", targets=["a"], references=["b"], anchor="c")))
    with pytest.raises(ValueError, match="unknown field.*anchor"):
        load_concept(path)
    path.write_text(json.dumps(dict(name="x", targets=["a"])))
    with pytest.raises(ValueError, match="missing field.*references"):
        load_concept(path)
    with pytest.raises(ValueError, match="2 references for 3 targets"):
        Concept(name="x", targets=("a", "b", "c"), references=("d", "e"))
    with pytest.raises(ValueError, match="kind"):
        Concept(name="x", targets="a", references="b", kind="scene")
    with pytest.raises(FileNotFoundError, match="no concept named 'no-such-thing'"):
        load_concept("no-such-thing")


def test_a_single_reference_is_broadcast_over_the_targets():
    concept = Concept(name="x", targets=("a", "b"), references="r")
    assert concept.pairs == [("a", "r"), ("b", "r")]
    assert concept.targets == ("a", "b") and concept.references == ("r",)


# A style concept turns the style into another style of the same shape (striped circle -> solid circle): its
# anchors are shapes the style table draws on purpose, and the erasure table scores object concepts only.
OBJECT_CONCEPTS = [name for name in list_concepts() if load_concept(name).kind != "style"]


@pytest.mark.parametrize("name", OBJECT_CONCEPTS)
def test_anchors_lie_outside_the_evaluated_prompts(name):
    # The objective trains the target towards its anchor, and the LoRA's side effects land on what the anchor
    # draws: an anchor the table also scores mixes the training signal into the measurement. The paper anchors
    # outside the evaluated classes.
    concept = load_concept(name)
    evaluated = {p for field in ("targets", "synonyms", "other", "paraphrases") for p in getattr(concept, field)}
    inside = sorted(set(concept.references) & evaluated)
    assert not inside, f"{name}: references {inside} are also evaluated prompts"
