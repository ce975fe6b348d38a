"""The procedural shapes data set: determinism, coverage, captions, visible rendering."""
import numpy as np
import pytest

from unguide_jax.data.shapes import CLASSES, STYLES, SYNONYMS, batch, caption_for, render


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
    from unguide_jax.data.shapes import class_named_in

    assert class_named_in("a photo of the half moon") == CLASSES.index("crescent")
    assert class_named_in("An image of a PLUS SIGN") == CLASSES.index("cross")
    assert class_named_in("a striped loop") == CLASSES.index("ring")
    assert class_named_in("a photo of a cat") is None
    assert class_named_in("a gemstone") is None  # "gem" only as a whole word
