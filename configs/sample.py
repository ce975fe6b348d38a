"""Text-to-image sampling. Each preset lists only what differs from the settings' defaults
(``unguide_jax.sampling.config.SampleConfig``: ``unguide-sample --help`` prints every key). Presets: default
(bring your own model and prompt), embedded (the shipped shapes model, one prompt per class), smoke (a random
tiny model), many (two erased concepts at once: the arrow and star LoRAs of ``unguide.py:many`` as two edits),
sdxl (an SDXL base model, with or without adapters: SDXL's Euler sampler, guidance scale 5 and bf16; the size is
the model's, 1024 px).

Several adapters add up into one edit, probed as one (``combine=merged``, the default). ``combine=flagged-mean``
makes them K edits with one probe: each prompt applies the LoRAs of the concepts it carries (each edit's own
bar, from its own concept) with w_erase, or their mean with w_keep when it carries none (``flagged``: all of
them together); ``combine=sum`` adds
up each edit's own UnGuidance correction. probe.json and manifest.json then record D, the bar and w per edit
and the edits each prompt flagged.

python sample.py --config configs/sample.py:embedded
python sample.py --config configs/sample.py:smoke
python train.py --config configs/unguide.py:many --config.concepts='["shapes-arrow", "shapes-star"]'
python sample.py --config configs/sample.py:many
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
    if preset == "many":
        # Any runs' adapters work alike (two single runs: runs/unguide-shapes-arrow, runs/unguide-shapes-star).
        return dict(model="embedded", adapters=["runs/unguide-many/concepts/shapes-arrow",
                                                "runs/unguide-many/concepts/shapes-star"], combine="flagged-mean",
                    prompts=[f"a photo of the {c}" for c in ("arrow", "star", "circle", "heart")], images_per_prompt=4,
                    batch_size=16, evaluator="embedded", grid_cols=4, out_dir="runs/many-samples")
    if preset == "sdxl":
        return dict(guidance_scale=5.0, sampler="euler", dtype="bfloat16", param_dtype="bfloat16", batch_size=2,
                    out_dir="runs/sdxl-samples")
    raise ValueError(f"unknown preset {preset!r} (default, embedded, smoke, many, sdxl)")
