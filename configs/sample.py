"""Text-to-image sampling. Presets: default (bring your own model), embedded (the shipped shapes model),
smoke (a random tiny model).

python sample.py --config configs/sample.py:embedded
python sample.py --config configs/sample.py:smoke
python sample.py --config configs/sample.py --config.model=/path/to/stable-diffusion-v1-5 --config.prompt="a photo of a cat"
"""


def get_config(preset: str = "default") -> dict:
    config = dict(
        model="",                    # a diffusers folder, a single-file .safetensors, a cached hub id, or "embedded"
        variant="",                  # diffusers weight variant, such as "fp16" ("": the default weights)
        revision="",                 # hub revision of a model given by hub id ("": the default)
        model_config="",   # single-file checkpoints: a config folder or sd1 | sd2-base | sd2-v ("": picked)
        create_random_model=False,   # smoke runs: build a random tiny model at `model` if missing
        prompt="",                   # exactly one of prompt / prompts / prompt_file / csv
        prompts=[],
        prompt_file="",              # one prompt per line
        csv="",                      # CSV with a prompt column (+ evaluation_seed, evaluation_guidance: I2P layout)
        negative_prompt="",
        images_per_prompt=1,
        seed=0,                      # image j of every prompt uses seed + j (CSV rows carry their own seeds)
        guidance_scale=7.5,
        num_steps=50,                # DDIM steps
        eta=0.0,
        height=0,                    # 0: the model's default size
        width=0,
        batch_size=4,
        dtype="float32",             # compute dtype: float32 | bfloat16
        param_dtype="float32",
        allow_pickle=False,          # load pickled .bin weights (torch.load weights_only=True)
        clip_skip=0,
        grid_cols=0,                 # 0: square-ish grid
        evaluator="",                # "embedded": classify the images with the shipped shapes classifier
        # Edits (several add up): adapter files, train.py run folders, Orbax checkpoints, PEFT/kohya LoRA files.
        adapters=[],
        mode="auto",                 # auto | base | adapter | unguide | fixed (auto: unguide with adapters, else base)
        w=2.0,                       # mode=fixed: w·CFG_base + (1 − w)·CFG_edit for every prompt
        # mode=unguide: the w probe (spec unguide.md §4). draws: 30 for objects (the paper probes once per
        # prompt), 10 for explicit content; every distinct prompt is probed once, D("") once per adapter.
        probe=dict(draws=30, t_enc=40, ddim_steps=50, timestep_mode="corrected", seed=0, w_erase=-1.0, w_keep=2.0,
                   rule="paper", prompt_chunk=8),
        fused=True,                  # UnGuidance: base and edited predictions in one UNet call per step
        overwrite=False,             # out_dir holds images made with other settings: replace them
        out_dir="runs/sample",
    )
    if preset == "embedded":
        from unguide_jax.shapes.data import CLASSES

        config.update(model="embedded", prompts=[f"a photo of the {c}" for c in CLASSES], images_per_prompt=4,
                      batch_size=40, evaluator="embedded", grid_cols=4, out_dir="runs/embedded-samples")
    elif preset == "smoke":
        config.update(
            model="runs/smoke-model", create_random_model=True, num_steps=20, images_per_prompt=2,
            prompts=["a photo of the cat", "a photo of the dog", "a striped airplane", "a dotted ship"],
            out_dir="runs/smoke-samples",
        )
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, embedded, smoke)")
    return config
