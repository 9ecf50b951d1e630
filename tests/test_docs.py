"""docs/concepts.md names the functions that implement each formula: every one of them exists."""

import importlib
import re
from pathlib import Path

import pytest

CONCEPTS = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"
NAMED = re.compile(r"`([\w/]+)\.py: ([\w., ]+)`")


def references():
    for path, names in NAMED.findall(CONCEPTS.read_text()):
        for name in (n.strip() for n in names.split(",")):
            yield path, name


@pytest.mark.parametrize("path,name", sorted(set(references())))
def test_every_function_named_in_concepts_exists(path, name):
    module = importlib.import_module("ppo_rlhf." + path.replace("/", "."))
    obj = module
    for part in name.split("."):
        assert hasattr(obj, part), f"docs/concepts.md names {path}.py: {name}, which does not exist"
        obj = getattr(obj, part)


def test_the_registries_are_documented():
    from ppo_rlhf.algo.advantages import ADVANTAGES
    from ppo_rlhf.algo.losses import AGGREGATIONS, POLICY_LOSSES

    text = CONCEPTS.read_text()
    for name in [*ADVANTAGES, *POLICY_LOSSES, *AGGREGATIONS]:
        assert f"| `{name}`" in text, f"docs/concepts.md has no row for {name}"
