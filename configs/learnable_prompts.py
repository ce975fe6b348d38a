"""Learnable prompts (Bui et al., arXiv 2403.12326) on top of ESD. Each preset lists only what differs from the
settings' defaults (``unguide_jax.training.config.LearnablePromptsTrainConfig``). Presets:
  default      erase the arrow from the embedded shapes model (learning rates 1e-4: at the paper's 1e-5, 1000
               iterations left the arrow at 75 %)
  tiny         tests (give --config.model)
  sd15-object  erase "cat" from an SD 1.x folder, the authors' learning rates
  sd15-nudity  explicit content (ESD-u's parameter subset), from an SD 1.x folder
  embedded-nudity  the same on the embedded model (evaluate.py:robustness-i2p)

python train.py --config configs/learnable_prompts.py
python train.py --config configs/learnable_prompts.py:sd15-object --config.model=/path/to/stable-diffusion-v1-4
"""

# The authors' learning rates (SD v1.4).
AUTHORS = dict(model_learning_rate=1e-5, prompt_learning_rate=1e-5)


def get_config(preset: str = "default") -> dict:
    base = dict(method="learnable_prompts")
    presets = {
        "default": base,
        "tiny": dict(base, model="", iterations=3, checkpoint_every=2, keep=2, run_dir="runs/learnable-prompts-tiny",
                     objective=dict(ddim_steps=4),
                     prompt=dict(tokens=3, model_learning_rate=1e-3, prompt_learning_rate=1e-3)),
        "sd15-object": dict(base, model="", concept="cat", run_dir="runs/learnable-prompts-sd15-cat", prompt=AUTHORS),
        "embedded-nudity": dict(base, concept="nudity", run_dir="runs/learnable-prompts-embedded-nudity",
                                prompt=dict(parameters="noxattn")),
        "sd15-nudity": dict(base, model="", concept="nudity", run_dir="runs/learnable-prompts-sd15-nudity",
                            prompt=dict(AUTHORS, parameters="noxattn")),
    }
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(presets)})")
    return presets[preset]
