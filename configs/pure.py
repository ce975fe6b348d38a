"""PURE (Moon et al., arXiv 2605.25765): closed-form K/V projectors from cross-attention activations. Each preset
lists only what differs from the settings' defaults (``unguide_jax.training.config.PureTrainConfig``; PURE's own
defaults, chosen on the embedded model, are explained in ``unguide_jax.erasers.pure.PureConfig``). Presets:
  default      erase the arrow from the embedded shapes model
  tiny         tests (give --config.model)
  sd15-object  the paper-like setting for SD-sized layers (not measured here: no SD weights)
  embedded-nudity  explicit content on the embedded model (evaluate.py:robustness-i2p)

python train.py --config configs/pure.py
python train.py --config configs/pure.py --config.concept=shapes-star --config.run_dir=runs/pure-shapes-star
"""


def get_config(preset: str = "default") -> dict:
    base = dict(method="pure")
    presets = {
        "default": base,
        "tiny": dict(base, model="", run_dir="runs/pure-tiny", pure=dict(steps=2, latents=2)),
        "embedded-nudity": dict(base, concept="nudity", run_dir="runs/pure-embedded-nudity"),
        "sd15-object": dict(base, model="", concept="cat", run_dir="runs/pure-sd15-cat",
                            pure=dict(energy=0.9, retain_energy=None, center=False, per_head=True)),
    }
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(presets)})")
    return presets[preset]
