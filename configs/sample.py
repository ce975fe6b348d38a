"""Text-to-image sampling. Each preset lists only what differs from the settings' defaults
(``unguide_jax.sampling.config.SampleConfig``: ``unguide-sample --help`` prints every key). Presets: default
(bring your own model and prompt), embedded (the shipped shapes model, one prompt per class), smoke (a random
tiny model).

python sample.py --config configs/sample.py:embedded
python sample.py --config configs/sample.py:smoke
python sample.py --config configs/sample.py --config.model=/path/to/stable-diffusion-v1-5 --config.prompt="a photo of a cat"
"""


def get_config(preset: str = "default") -> dict:
    if preset == "default":
        return {}
    if preset == "embedded":
        from unguide_jax.shapes.data import CLASSES

        return dict(model="embedded", prompts=[f"a photo of the {c}" for c in CLASSES], images_per_prompt=4,
                    batch_size=40, evaluator="embedded", grid_cols=4, out_dir="runs/embedded-samples")
    if preset == "smoke":
        return dict(model="runs/smoke-model", create_random_model=True, num_steps=20, images_per_prompt=2,
                    prompts=["a photo of the cat", "a photo of the dog", "a striped airplane", "a dotted ship"],
                    out_dir="runs/smoke-samples")
    raise ValueError(f"unknown preset {preset!r} (default, embedded, smoke)")
