"""One definition per setting: every job's settings built from the Python API with no arguments equal the ones
its command builds with no overrides, the commands use the library's settings classes as they are, and the
presets list only what differs from the defaults."""
from __future__ import annotations

import contextlib
import io
import json
import typing

import pytest

from unguide_jax.cli import export as export_cli
from unguide_jax.cli import recipe as recipe_cli
from unguide_jax.cli import sample as sample_cli
from unguide_jax.cli import train as train_cli
from unguide_jax.edits.lora import LoraConfig
from unguide_jax.erasers.learnable_prompts import PromptConfig
from unguide_jax.erasers.pure import PureConfig
from unguide_jax.erasers.uce import UceConfig
from unguide_jax.erasers.unguide.objective import ObjectiveConfig
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.evaluation.attack import AttackConfig
from unguide_jax.evaluation.config import AttackSettings, EvaluateConfig, I2PConfig
from unguide_jax.presets import load_config_file
from unguide_jax.publishing.export import ExportConfig
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.settings import to_dict
from unguide_jax.shapes.recipe_config import RecipeConfig
from unguide_jax.training.config import (
    LearnablePromptsTrainConfig,
    PureTrainConfig,
    UceTrainConfig,
    UnguideTrainConfig,
)


def printed_config(main, argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv + ["--print-config"]) == 0
    return json.loads(out.getvalue())


# (the command's entry point, its arguments without overrides, the settings the Python API builds)
JOBS = {
    "train unguide": (train_cli.main, [], UnguideTrainConfig()),
    "train learnable_prompts": (train_cli.main, ["--config", "learnable_prompts.py"], LearnablePromptsTrainConfig()),
    "train pure": (train_cli.main, ["--config", "pure.py"], PureTrainConfig()),
    "train uce": (train_cli.main, ["--config", "uce.py"], UceTrainConfig()),
    "sample": (sample_cli.main, [], SampleConfig()),
    "evaluate": (sample_cli.main, ["--config", "evaluate.py"], EvaluateConfig()),
    "i2p": (sample_cli.main, ["--config", "evaluate.py:i2p"], I2PConfig()),
    "recipe": (recipe_cli.main, [], RecipeConfig()),
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_the_command_and_the_python_api_start_from_the_same_settings(job):
    main, argv, api = JOBS[job]
    assert printed_config(main, argv) == to_dict(api)


def test_an_eraser_picked_by_method_alone_gets_its_defaults():
    for method, api in (("learnable_prompts", LearnablePromptsTrainConfig()), ("pure", PureTrainConfig()),
                        ("uce", UceTrainConfig())):
        assert printed_config(train_cli.main, [f"--config.method={method}"]) == to_dict(api)


def test_the_export_command_and_the_python_api_start_from_the_same_settings():
    parsed = export_cli.parse(["runs/a", "--out", "export"])
    assert parsed == ExportConfig(sources=("runs/a",), out="export")
    probed = export_cli.parse(["runs/a", "--out", "export", "--probe", "rule=sequential", "round_draws=3", "z=3"])
    assert probed.probe == ProbeConfig(rule="sequential", round_draws=3, z=3.0)


def test_the_commands_use_the_library_settings_classes_as_they_are():
    """No mirror classes: a job's sub-settings are the eraser's, the LoRA's, the probe's own."""
    expected = {
        (UnguideTrainConfig, "lora"): LoraConfig, (UnguideTrainConfig, "objective"): ObjectiveConfig,
        (LearnablePromptsTrainConfig, "prompt"): PromptConfig, (PureTrainConfig, "pure"): PureConfig,
        (UceTrainConfig, "uce"): UceConfig, (SampleConfig, "probe"): ProbeConfig,
        (EvaluateConfig, "probe"): ProbeConfig, (I2PConfig, "probe"): ProbeConfig,
        (ExportConfig, "probe"): ProbeConfig, (AttackSettings, "settings"): AttackConfig,
    }
    for (cls, field), settings in expected.items():
        assert typing.get_type_hints(cls)[field] is settings, (cls.__name__, field)


def test_the_probe_has_one_default_rule():
    """The rule behind the README's table is the default of sampling, evaluation and export alike."""
    assert ProbeConfig().rule == "calibrated"
    for config in (SampleConfig(), EvaluateConfig(), I2PConfig(), ExportConfig()):
        assert config.probe.rule == ProbeConfig().rule


PRESET_FILES = {
    "unguide.py": ["default", "paper", "tiny", "sd15-object", "sd15-nudity", "many", "embedded-nudity", "sdxl-object"],
    "learnable_prompts.py": ["default", "tiny", "sd15-object", "sd15-nudity", "embedded-nudity"],
    "pure.py": ["default", "tiny", "sd15-object", "embedded-nudity"],
    "uce.py": ["default", "tiny", "sd15-object", "embedded-nudity"],
    "sample.py": ["default", "embedded", "smoke", "many", "sdxl"],
    "evaluate.py": ["default", "all-classes", "held-out", "compare", "robustness", "robustness-i2p", "tiny", "i2p",
                    "sd14-table1", "sd14-i2p", "retention", "many"],
    "embedded.py": ["default", "tiny", "continued", "twelfth"],
}
SCHEMA_KEYS = ("method", "job")  # they pick the settings class, so a preset may name its own


def _repeats(raw: dict, defaults: dict, prefix: str = "") -> list[str]:
    repeated = []
    for key, value in raw.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and value and set(value) <= set(default):
            repeated += _repeats(value, default, f"{prefix}{key}.")
        elif value == default and key not in SCHEMA_KEYS:
            repeated.append(prefix + key)
    return repeated


@pytest.mark.parametrize("file", sorted(PRESET_FILES))
def test_presets_list_only_what_differs_from_the_defaults(file):
    from unguide_jax.settings import schema_for
    from unguide_jax.training.config import train_schema

    schema = {"sample.py": sample_cli.sample_or_evaluate, "evaluate.py": sample_cli.sample_or_evaluate,
              "embedded.py": RecipeConfig}.get(file, train_schema)
    for preset in PRESET_FILES[file]:
        raw = load_config_file(f"{file}:{preset}")
        cls = schema_for(schema, raw)
        defaults = to_dict(cls())
        assert not _repeats(raw, defaults), f"{file}:{preset} repeats defaults: {_repeats(raw, defaults)}"
