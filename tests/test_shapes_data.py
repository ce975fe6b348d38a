"""The procedural shapes data set: determinism, coverage, captions, visible rendering."""
import numpy as np
import pytest

from unguide_jax.shapes.data import (
    CLASSES,
    STYLES,
    SYNONYMS,
    batch,
    batch_at,
    caption_for,
    indices_for_class_weights,
    label_of,
    render,
)


def test_examples_depend_on_seed_and_index_only():
    images, captions, labels, styles = batch(seed=3, start=10, count=6)
    again = batch(seed=3, start=12, count=2)  # a slice of the same stream
    np.testing.assert_array_equal(again[0], images[2:4])
    assert again[1] == captions[2:4]
    other = batch(seed=4, start=10, count=6)
    assert not np.array_equal(other[0], images)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8


def test_stream_covers_every_class_and_style():
    _, captions, labels, styles = batch(seed=0, start=0, count=400)
    assert set(labels) == set(range(len(CLASSES))) and set(styles) == set(range(len(STYLES)))
    for caption, label in zip(captions, labels):
        words = [CLASSES[label], *SYNONYMS[CLASSES[label]]]
        assert any(w in caption for w in words), caption


def test_synonyms_are_unique_and_never_another_class_name():
    words = [w for c in CLASSES for w in (c, *SYNONYMS[c])]
    assert len(words) == len(set(words)) == 40


def test_captions_use_the_right_article():
    rng = np.random.default_rng(0)
    captions = [caption_for(rng, "cross", "outlined", synonym_prob=1.0, style_prob=0.0)[0] for _ in range(50)]
    assert not any(" a intersection" in c or c.startswith("a intersection") for c in captions)
    assert any("an intersection mark" in c for c in captions)


@pytest.mark.parametrize("style", STYLES)
def test_every_class_draws_a_visible_shape(style):
    for cls in CLASSES:
        image = render(np.random.default_rng(1), cls, style, size=32).astype(int)
        background = image[0, 0]  # corners are background at these scales and positions
        differs = np.abs(image - background).sum(-1) > 60
        assert 0.01 < differs.mean() < 0.9, (cls, style, differs.mean())


def test_styles_change_the_image_but_not_the_layout():
    solid = render(np.random.default_rng(5), "square", "solid", 32).astype(int)
    outlined = render(np.random.default_rng(5), "square", "outlined", 32).astype(int)
    background = solid[0, 0]
    solid_px = (np.abs(solid - background).sum(-1) > 60).sum()
    outlined_px = (np.abs(outlined - background).sum(-1) > 60).sum()
    assert 0 < outlined_px < 0.8 * solid_px


def test_class_named_in_finds_names_and_synonyms_as_whole_words():
    from unguide_jax.shapes.data import class_named_in

    assert class_named_in("a photo of the half moon") == CLASSES.index("crescent")
    assert class_named_in("An image of a PLUS SIGN") == CLASSES.index("cross")
    assert class_named_in("a striped loop") == CLASSES.index("ring")
    assert class_named_in("a photo of a cat") is None
    assert class_named_in("a gemstone") is None  # "gem" only as a whole word


def test_class_weights_pick_each_class_in_proportion_from_the_same_stream():
    indices = indices_for_class_weights(seed=6, count=130, class_weights={"heart": 2.0, "square": 3.0})
    images, captions, labels, _ = batch_at(6, indices)
    counts = np.bincount(labels, minlength=len(CLASSES))
    assert counts[CLASSES.index("square")] == 30 and counts[CLASSES.index("heart")] == 20
    assert sorted(set(counts) - {20, 30}) == [10] and counts.sum() == 130  # weights 3 + 2 + 8 x 1 share 130
    # The picked examples are the stream's own (same image and caption), each class's first ones in it.
    plain = batch(6, 0, int(indices.max()) + 1)
    np.testing.assert_array_equal(plain[0][indices], images)
    assert [plain[1][i] for i in indices] == captions
    for cls in ("heart", "circle"):
        first = np.flatnonzero(plain[2] == CLASSES.index(cls))[:counts[CLASSES.index(cls)]]
        np.testing.assert_array_equal(indices[labels == CLASSES.index(cls)], first)
    assert all(label_of(6, int(i)) == plain[2][i] for i in range(len(plain[2])))


@pytest.mark.parametrize("weights, message", [({"hexagon": 2.0}, r"unknown classes \['hexagon'\]"),
                                              ({"heart": 0.0}, "must be positive")])
def test_bad_class_weights_are_named(weights, message):
    with pytest.raises(ValueError, match=message):
        indices_for_class_weights(0, 10, weights)


def test_uneven_class_weights_still_give_exactly_count_examples():
    indices = indices_for_class_weights(seed=2, count=7, class_weights={"ring": 3.0})
    labels = [label_of(2, int(i)) for i in indices]
    assert len(indices) == len(set(indices.tolist())) == 7 and labels.count(CLASSES.index("ring")) == 2
