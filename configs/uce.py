"""UCE (spec erasers.md §3): the closed-form K/V edit baseline. Presets: default (erase the arrow from the
embedded shapes model), tiny (tests: give --config.model), sd15-object.

python train.py --config configs/uce.py
"""


def get_config(preset: str = "default") -> dict:
    config = dict(
        method="uce",
        model="embedded",
        variant="",               # diffusers weight variant, such as "fp16" ("": the default weights)
        revision="",              # hub revision of a model given by hub id ("": the default)
        model_config="",   # single-file checkpoints: a config folder or sd1 | sd2-base | sd2-v ("": picked)
        concept="shapes-arrow",       # erase: forget anchors; preserve: retain anchors
        uce=dict(
            lam=0.5,
            erase_scale=1.0,
            preserve_scale=1.0,
            tokens="subject_to_end",  # subject_to_end (the authors' code) | subject
            guide="empty",            # empty ("") | reference (the concept's reference prompt)
        ),
        dtype="float32",
        param_dtype="float32",
        allow_pickle=False,
        run_dir="runs/uce-shapes-arrow",
        overwrite=False,          # run_dir holds another run: replace it (built beside it, swapped in at the end)
        export=["peft", "partial_unet"],
    )
    if preset == "tiny":
        config.update(model="", run_dir="runs/uce-tiny")
    elif preset == "sd15-object":
        config.update(model="", concept="cat", run_dir="runs/uce-sd15-cat")
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, tiny, sd15-object)")
    return config
