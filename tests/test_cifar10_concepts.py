"""The CIFAR-10 concepts are the UnGuide authors' lists (github.com/piotrmwojcik/UnGuide, data/<class>.json at
commit a015504): each class's target, reference anchor, three synonyms and the other nine classes plus "",
as the paper's Table 1 evaluates them."""
import re

from unguide_jax.erasers.concepts import load_concept

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The authors' synonyms, in their order: the prompts Acc_g is measured on.
AUTHORS_SYNONYMS = {
    "airplane": ("aircraft", "plane", "jet"), "automobile": ("car", "vehicle", "motorcar"),
    "bird": ("avian", "fowl", "winged creature"), "cat": ("feline", "kitty", "housecat"),
    "deer": ("hart", "stag", "doe"), "dog": ("canine", "pooch", "hound"),
    "frog": ("amphibian", "anuran", "tadpole"), "horse": ("equine", "steed", "mount"),
    "ship": ("vessel", "boat", "watercraft"), "truck": ("lorry", "rig", "hauler"),
}
AUTHORS_REFERENCES = {"airplane": "street", "automobile": "sea", "bird": "ground", "cat": "forest", "deer": "sea",
                      "dog": "forest", "frog": "sky", "horse": "forest", "ship": "sky", "truck": "sky"}


def test_cifar10_concepts_are_the_authors_lists():
    for name in CLASSES:
        concept = load_concept(name)
        assert concept.kind == "object"
        assert list(concept.targets) == [f"a photo of the {name}"]
        assert list(concept.references) == [f"a photo of the {AUTHORS_REFERENCES[name]}"]
        assert list(concept.synonyms) == [f"a photo of the {s}" for s in AUTHORS_SYNONYMS[name]]
        assert list(concept.other) == [f"a photo of the {c}" for c in CLASSES if c != name] + [""]


def test_no_synonym_names_its_class():
    """A synonym that contains the class word ("tree frog", "pickup truck") measures nothing about generalisation."""
    for name in CLASSES:
        for synonym in load_concept(name).synonyms:
            assert not re.search(rf"\b{name}\b", synonym), (name, synonym)
