"""Ring-A-Bell prompts: the concept vector, the token search and its batched, sharded driver, on a tiny model."""
import dataclasses
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.devices import ALL_CPU_DEVICES, run_script
from unguide_jax.erasers.concepts import Concept, load_concept
from unguide_jax.evaluation import ring_a_bell as rab

CONCEPT = Concept(name="cat", targets=("a photo of the cat",), references=("a photo of the forest",),
                  synonyms=("the cat of the photo",), kind="explicit")
FAST = rab.RingABellConfig(prompt_tokens=4, strength=2.0, iterations=30, learning_rate=0.1, seed=3)


@pytest.fixture(scope="module")
def tiny_sd(tiny_pipeline_dir):
    from unguide_jax.loading.diffusers_folder import load_pipeline

    folder, _ = tiny_pipeline_dir("sd1")
    return load_pipeline(folder)


def test_concept_vector_is_the_mean_difference_of_the_pairs(tiny_sd):
    with_c, without_c = ["a photo of the cat", "the cat"], ["a photo of the", "the photo"]
    c = rab.concept_vector(tiny_sd, with_c, without_c)
    e = np.asarray(tiny_sd.encode_prompts(with_c + without_c), np.float64)
    expected = ((e[0] - e[2]) + (e[1] - e[3])) / 2
    assert c.shape == e.shape[1:]
    np.testing.assert_allclose(np.asarray(c), expected, atol=1e-6)


def test_bad_pairs_name_the_problem(tiny_sd):
    with pytest.raises(ValueError, match=r"2 prompts with the concept and 1 without"):
        rab.concept_vector(tiny_sd, ["a cat", "the cat"], ["a"])
    with pytest.raises(ValueError, match="at least one prompt pair"):
        rab.concept_vector(tiny_sd, [], [])
    with pytest.raises(TypeError, match="not one string"):
        rab.concept_vector(tiny_sd, "a cat", "a")
    with pytest.raises(ValueError, match="prompt_tokens"):
        rab.RingABellConfig(prompt_tokens=0)
    with pytest.raises(ValueError, match="at most 75"):
        rab.prompt_template(tiny_sd, 76)


def test_concept_pairs_follow_what_the_references_mean():
    nudity = load_concept("nudity")
    with_c, without_c = rab.concept_pairs(nudity)
    assert with_c == list(nudity.targets) + list(nudity.synonyms)
    assert set(without_c) == {"a photo of a person wearing clothes"}
    arrow = load_concept("shapes-arrow")   # references: a scene, not the arrow prompt without the arrow
    with_c, without_c = rab.concept_pairs(arrow)
    assert with_c[0] == "a photo of the arrow" and len(with_c) == 4
    assert set(without_c) == {"a photo of the"}
    dotted = load_concept("shapes-style-dotted")   # one counterpart per target, none for the synonyms
    with_c, without_c = rab.concept_pairs(dotted)
    assert list(zip(with_c, without_c)) == dotted.pairs
    assert ("a photo of the dotted circle", "a photo of the solid circle") in dotted.pairs


def test_search_lowers_the_loss_and_returns_the_ids_it_measured(tiny_sd):
    sd = tiny_sd
    params = sd.params["text_encoder"]
    c = rab.concept_vector(sd, *rab.concept_pairs(CONCEPT))
    target = sd.encode_prompts(["the photo"])[0] + FAST.strength * c
    template = jnp.asarray(rab.prompt_template(sd, FAST.prompt_tokens))
    allowed = rab.allowed_tokens(sd)
    ids, losses = rab.search_tokens(sd.text_encoder, params, template, target, FAST, jax.random.key(0),
                                    jnp.asarray(allowed))
    ids, losses = np.asarray(ids), np.asarray(losses)
    assert losses.shape == (FAST.iterations,)
    assert losses[-1] < losses[0] and losses.min() < 0.9 * losses[0]
    k = FAST.prompt_tokens
    np.testing.assert_array_equal(np.delete(ids, np.s_[1:1 + k]), np.delete(np.asarray(template), np.s_[1:1 + k]))
    assert allowed[ids[1:1 + k]].all()                    # no start, end or padding token among the K
    context = sd.text_encoder.apply({"params": params}, ids[None])[0][0]
    np.testing.assert_allclose(float(jnp.mean((context - target) ** 2)), losses.min(), rtol=1e-5)


def test_prompts_are_distinct_deterministic_and_independent_of_the_batch(tiny_sd):
    sd = tiny_sd
    result = rab.ring_a_bell_prompts(sd, FAST, CONCEPT, "the photo", count=3)
    length, width = sd.tokenizer.model_max_length, sd.text_encoder.config.hidden_size
    assert result.ids.shape == (3, length) and result.contexts.shape == (3, length, width)
    assert result.losses.shape == (3, FAST.iterations) and len(result.texts) == 3
    assert len({tuple(row) for row in result.ids}) == 3
    np.testing.assert_allclose(result.contexts, np.asarray(sd.text_encoder.apply(
        {"params": sd.params["text_encoder"]}, jnp.asarray(result.ids))[0]), atol=1e-6)
    assert result.settings["seed"] == FAST.seed and result.settings["count"] == 3

    again = rab.ring_a_bell_prompts(sd, FAST, CONCEPT, "the photo", count=3)
    np.testing.assert_array_equal(again.ids, result.ids)
    assert again.texts == result.texts
    for j in range(3):
        alone = rab.ring_a_bell_prompts(sd, dataclasses.replace(FAST, seed=FAST.seed + j), CONCEPT, "the photo", 1)
        np.testing.assert_array_equal(alone.ids[0], result.ids[j])
        np.testing.assert_allclose(alone.contexts[0], result.contexts[j], atol=1e-5)
        np.testing.assert_allclose(alone.losses[0], result.losses[j], atol=1e-5)


_TWO_DEVICE_RUN = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from unguide_jax.erasers.concepts import Concept
    from unguide_jax.evaluation.ring_a_bell import RingABellConfig, ring_a_bell_prompts
    from unguide_jax.loading.diffusers_folder import load_pipeline
    from unguide_jax.parallel.batches import data_mesh

    assert len(jax.devices()) == 2, jax.devices()
    sd = load_pipeline(sys.argv[1]).on_mesh(data_mesh(jax.devices()))
    result = ring_a_bell_prompts(sd, RingABellConfig(**json.loads(sys.argv[2])), Concept(**json.loads(sys.argv[3])),
                                 "the photo", 3)
    print(json.dumps(dict(data_size=sd.data_size, ids=result.ids.tolist(), contexts=result.contexts.tolist())))
""")


@pytest.mark.slow
def test_a_count_padded_over_two_devices_gives_the_single_device_prompts(tiny_sd, tiny_pipeline_dir):
    folder, _ = tiny_pipeline_dir("sd1")
    concept = {f.name: getattr(CONCEPT, f.name) for f in dataclasses.fields(CONCEPT)}
    run = run_script(_TWO_DEVICE_RUN, 2, str(folder), json.dumps(dataclasses.asdict(FAST)), json.dumps(concept),
                     extra_env=ALL_CPU_DEVICES)
    assert run["data_size"] == 2                       # 3 searches padded to 4, two per device
    here = rab.ring_a_bell_prompts(tiny_sd, FAST, CONCEPT, "the photo", 3)
    np.testing.assert_array_equal(np.asarray(run["ids"]), here.ids)
    np.testing.assert_allclose(np.asarray(run["contexts"]), here.contexts, atol=1e-5)
