"""The embedded shapes model's pretraining recipe: what differs from the defaults of ``RecipeConfig``
(``unguide_jax/shapes/recipe_config.py``). Presets:

- default: phase 1, every stage from scratch;
- continued, third, ..., twelfth: phases 2-12 (``PHASES``), each training the UNet on from the run of the
  phase before; twelfth made the shipped model;
- tiny: tests.

python -m unguide_jax.cli.recipe --config configs/embedded.py
python -m unguide_jax.cli.recipe --config configs/embedded.py:twelfth   # after phases 1-11
python -m unguide_jax.cli.recipe --config configs/embedded.py:tiny --config.work_dir=/tmp/recipe
"""
import copy

_RUN = "runs/embedded-recipe"  # phase 1's work_dir (the default); phase NAME runs in f"{_RUN}-{NAME}"

_LATE = dict(batch_size=128, learning_rate=5e-4, warmup=100, loss_weighting="min_snr")

# Phases 2-12 in order: the diffusion settings of each (steps 2500 unless given). Why each phase chose
# them, and what it measured: docs/history.md, "The embedded model's training phases".
PHASES = {
    "continued": dict(steps=3000, warmup=100, loss_weighting="min_snr"),
    "third": dict(_LATE, steps=2000),
    "fourth": dict(_LATE, data_seed=302),
    "fifth": dict(_LATE, data_seed=303),
    "sixth": dict(_LATE, data_seed=304),
    "seventh": dict(_LATE, data_seed=305, class_weights={"heart": 2.0, "square": 2.0}),
    "eighth": dict(_LATE, data_seed=306, class_weights={"heart": 2.0, "square": 2.0}),
    "ninth": dict(_LATE, data_seed=307, class_weights={"square": 3.0, "heart": 2.0, "diamond": 2.0}),
    "tenth": dict(_LATE, data_seed=308, class_weights={"square": 3.0, "heart": 3.0, "diamond": 2.0, "circle": 2.0}),
    "eleventh": dict(_LATE, steps=3000, data_seed=309,
                     class_weights={"square": 3.0, "diamond": 3.0, "heart": 2.0, "circle": 2.0, "cross": 2.0}),
    "twelfth": dict(_LATE, steps=3000, data_seed=310,
                    class_weights={"square": 4.0, "heart": 3.0, "diamond": 3.0, "circle": 2.0, "cross": 2.0}),
}
DECODER_FROM = "ninth"  # this phase and the later ones also run the vae_decoder stage, right after the VAE

_TINY = dict(
    work_dir="runs/embedded-recipe-tiny",
    evaluator=dict(channels=[8, 16], steps=3, batch_size=16, eval_images=32),
    vae=dict(block_out_channels=[8, 8], norm_num_groups=4, steps=3, batch_size=4, warmup=1),
    vae_decoder=dict(steps=3, batch_size=4, warmup=1, eval_images=16),
    text_encoder=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      steps=3, batch_size=16, warmup=1),
    unet=dict(block_out_channels=[16, 32], attention_heads=[2, 2]),
    diffusion=dict(steps=3, batch_size=4, warmup=1, train_images=16),
    quality=dict(images_per_prompt=1, style_images_per_prompt=1, num_steps=2, batch_size=64),
)


def get_config(preset: str = "default") -> dict:
    if preset == "default":
        return {}
    if preset == "tiny":
        return copy.deepcopy(_TINY)
    if preset not in PHASES:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(['default', 'tiny', *PHASES])})")
    names = list(PHASES)
    index = names.index(preset)
    previous = _RUN if index == 0 else f"{_RUN}-{names[index - 1]}"
    config = dict(work_dir=f"{_RUN}-{preset}",
                  reuse_from=previous,  # copies the earlier stages that previous run made with the same settings
                  diffusion=dict(init_unet=f"{previous}/shapes-sd/unet", **copy.deepcopy(PHASES[preset])))
    if index >= names.index(DECODER_FROM):
        config["stages"] = ["tokenizer", "evaluator", "vae", "vae_decoder", "text_encoder", "diffusion", "quality"]
    return config

