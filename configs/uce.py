"""UCE (Gandikota et al., WACV 2024): the closed-form K/V edit baseline. Each preset lists only what differs from
the settings' defaults (``unguide_jax.training.config.UceTrainConfig``). Presets: default (erase the arrow from the
embedded shapes model), tiny (tests: give --config.model), sd15-object, embedded-nudity (explicit content on the
embedded model, for evaluate.py:robustness-i2p).

python train.py --config configs/uce.py
"""


def get_config(preset: str = "default") -> dict:
    base = dict(method="uce")
    presets = {
        "default": base,
        "tiny": dict(base, model="", run_dir="runs/uce-tiny"),
        "embedded-nudity": dict(base, concept="nudity", run_dir="runs/uce-embedded-nudity"),
        "sd15-object": dict(base, model="", concept="cat", run_dir="runs/uce-sd15-cat"),
    }
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(presets)})")
    return presets[preset]
