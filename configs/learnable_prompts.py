"""Learnable prompts (spec erasers.md §1) on top of ESD. Presets: default (erase the arrow from the embedded
shapes model), tiny (tests: give --config.model), sd15-object, sd15-nudity (from an SD 1.x folder).

python train.py --config configs/learnable_prompts.py
python train.py --config configs/learnable_prompts.py:sd15-object --config.model=/path/to/stable-diffusion-v1-4
"""


def authors_prompt_settings(config: dict) -> dict:
    """The authors' learning rates (SD v1.4)."""
    return dict(config["prompt"], model_learning_rate=1e-5, prompt_learning_rate=1e-5)


def get_config(preset: str = "default") -> dict:
    config = dict(
        method="learnable_prompts",
        model="embedded",
        variant="",               # diffusers weight variant, such as "fp16" ("": the default weights)
        revision="",              # hub revision of a model given by hub id ("": the default)
        model_config="",   # single-file checkpoints: a config folder or sd1 | sd2-base | sd2-v ("": picked)
        concept="shapes-arrow",
        prompt=dict(
            tokens=10,               # m learnable key/value tokens
            scope="mid",             # mid | midout | inmidout
            parameters="xattn",      # xattn (attn2: objects, styles) | noxattn (ESD-u: nudity)
            init="concept",          # concept (encoder output at the concept word) | random
            prompt_steps=2,          # prompt updates per iteration
            model_weight=1.0,        # L1 = 1.0 · ‖ε_θ' − ε*‖² + 0.1 · ‖ε_θ',p − ε*‖²
            prompt_weight=0.1,
            # 1e-4 on the embedded model: at the paper's 1e-5 (SD v1.4, the sd15 presets) 1000 iterations
            # left the arrow at 75 % (README, "Learnable prompts").
            model_learning_rate=1e-4,
            prompt_learning_rate=1e-4,
        ),
        objective=dict(              # ESD: the empty prompt as e0, η = 1, start guidance 3
            start_guidance=3.0,
            negative_guidance=1.0,
            ddim_steps=50,
            timestep_mode="corrected",
            samples_per_step=1,
        ),
        iterations=1000,
        seed=0,
        dtype="float32",
        param_dtype="float32",
        allow_pickle=False,
        checkpoint_every=100,
        keep=3,
        resume=False,
        divergence=dict(factor=20.0, warmup=10),  # stop when loss/adapter norm > factor x early range (0: off)
        mesh=dict(data=0, fsdp=0),   # device mesh; 0, 0: derived from the device count and the batch
        remat="",                    # gradient checkpointing of UNet blocks: "" | blocks | dots (less memory)
        run_dir="runs/learnable-prompts-shapes-arrow",
        overwrite=False,          # run_dir holds another run: replace it (built beside it, swapped in at the end)
        # run_dir gets edit.safetensors (tokens dropped at inference: the authors' evaluation) and
        # edit_with_prompt.safetensors (tokens kept); give sample.py the one you want.
        export=["partial_unet", "prompt"],
    )
    if preset == "tiny":
        config.update(model="", iterations=3, checkpoint_every=2, keep=2, run_dir="runs/learnable-prompts-tiny",
                      objective=dict(config["objective"], ddim_steps=4),
                      prompt=dict(config["prompt"], tokens=3, model_learning_rate=1e-3, prompt_learning_rate=1e-3))
    elif preset == "sd15-object":
        config.update(model="", concept="cat", run_dir="runs/learnable-prompts-sd15-cat",
                      prompt=authors_prompt_settings(config))
    elif preset == "sd15-nudity":
        config.update(model="", concept="nudity", prompt=dict(authors_prompt_settings(config), parameters="noxattn"),
                      run_dir="runs/learnable-prompts-sd15-nudity")
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, tiny, sd15-object, sd15-nudity)")
    return config
