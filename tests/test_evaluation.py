"""The erasure evaluation's scoring (spec unguide.md §6), by hand-made classifier outputs."""
import numpy as np
import pytest

from unguide_jax.evaluation import PromptSet, harmonic_overall, score
from unguide_jax.unguide.concepts import load_concept


def test_prompt_set_of_a_shipped_concept():
    ps = PromptSet.from_concept(load_concept("shapes-circle"))
    assert ps.erased == 0 and len(ps.items) == 13  # target, 3 synonyms, 9 other classes ("" left to the probe)
    assert [k for _, k, _ in ps.items].count("synonym") == 3
    assert sorted(c for _, k, c in ps.items if k == "other") == list(range(1, 10))
    with pytest.raises(ValueError, match="object concepts of the shapes model"):
        PromptSet.from_concept(load_concept("cat"))


def test_scores_under_both_protocols():
    ps = PromptSet(erased=0, items=(("t", "target", 0), ("s1", "synonym", 0), ("s2", "synonym", 0),
                                    ("o1", "other", 1), ("o2", "other", 2)))
    owners = np.repeat(np.arange(5), 2)
    p = np.full((10, 3), 0.1)
    hit = lambda c, strength=0.8: np.eye(3)[c] * (strength - 0.1) + 0.1  # noqa: E731
    p[0], p[1] = hit(0), hit(1)          # target: one image still the erased class
    p[2], p[3] = hit(2), hit(2)          # synonym 1: erased
    p[4], p[5] = hit(0), hit(0)          # synonym 2: leaks
    p[6], p[7] = hit(1), hit(1)          # other 1: kept
    p[8], p[9] = hit(2), hit(0)          # other 2: one image turned into the erased class
    got = score(ps, p, owners)
    mace = got["mace"]
    assert (mace["acc_e"], mace["acc_g"], mace["acc_s"]) == (0.5, 0.5, 0.75)
    assert mace["h_o"] == pytest.approx(3 / (2 + 1 / 0.75 + 2))
    # reference: texts per class (3, 1, 1): an image's score is its class's share of 3 p_0 + p_1 + p_2.
    ref = got["reference"]
    share = lambda probs, c: (probs * [3, 1, 1])[c] / (probs * [3, 1, 1]).sum()  # noqa: E731
    assert ref["acc_e"] == pytest.approx((share(p[0], 0) + share(p[1], 0)) / 2)
    assert ref["acc_s"] == pytest.approx(np.mean([share(p[6], 1), share(p[7], 1), share(p[8], 2), share(p[9], 2)]))
    assert ref["per_prompt"]["s2"] == pytest.approx(share(p[4], 0))


def test_harmonic_overall_is_zero_when_a_term_is():
    assert harmonic_overall(1.0, 0.9, 0.1) == 0.0
    assert harmonic_overall(0.0, 1.0, 0.0) == pytest.approx(1.0)
