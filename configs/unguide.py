"""UnGuide LoRA training. Presets: default (erase the arrow from the embedded shapes model: the paper's settings
transferred to this model by the kv_scale rule, A initialised along the concept), paper (the paper's settings
exactly: lr 3e-5, random A),
tiny (tests: give --config.model), sd15-object (erase "cat" from an SD 1.x folder),
sd15-nudity (explicit content, ESD-u-style targets, from an SD 1.x folder).

python train.py --config configs/unguide.py
python train.py --config configs/unguide.py --config.concept=shapes-star --config.run_dir=runs/unguide-star
python train.py --config configs/unguide.py:sd15-object --config.model=/path/to/stable-diffusion-v1-4
python train.py --config configs/unguide.py --config.resume=true      # continue from the latest checkpoint
"""


def get_config(preset: str = "default") -> dict:
    paper_settings = dict(transfer="none", lora=dict(rank=1, alpha=8.0, targets="object", init="random"))
    config = dict(
        method="unguide",
        model="embedded",        # "embedded", a diffusers folder, a single-file .safetensors or a cached hub id
        variant="",              # diffusers weight variant, such as "fp16" ("": the default weights)
        revision="",             # hub revision of a model given by hub id ("": the default)
        model_config="",   # single-file checkpoints: a config folder or sd1 | sd2-base | sd2-v ("": picked)
        concept="shapes-arrow",   # a shipped name (configs/concepts/<name>.json) or a path to a concept JSON
        lora=dict(
            rank=1,
            alpha=8.0,           # multiplies A @ B directly (UnGuide's convention, not PEFT's alpha / r)
            targets="object",    # "object" (attn2.to_k/to_v), "explicit" (ESD-u style), or a regex over module paths
            init="concept",      # A along the target's tokens (ours; the paper: "random", A ~ N(0, 1/r²))
        ),
        objective=dict(          # spec unguide.md §3, §5
            start_guidance=9.0,
            negative_guidance=2.0,
            ddim_steps=50,
            timestep_mode="corrected",  # "corrected" (query at the true timestep) or "reference" (the paper's code)
            samples_per_step=1,
        ),
        learning_rate=3e-5,      # Adam (0.9, 0.999, 1e-8), no schedule, no clipping: the paper's SD 1.4 value
        transfer="kv_scale",     # scale it to this model's K/V scale (printed, in config.json); "none": as given
        iterations=200,
        seed=0,                  # LoRA init and every per-step draw (x_T, t_enc, t)
        dtype="float32",         # compute dtype: float32 | bfloat16
        param_dtype="float32",   # stored base weights; the adapter and Adam state are always fp32
        allow_pickle=False,      # load pickled .bin weights (torch.load weights_only=True)
        checkpoint_every=50,     # Orbax checkpoint every N steps (0: only the final one)
        keep=3,                  # checkpoints kept (the newest ones)
        resume=False,            # continue from run_dir/checkpoints' latest complete checkpoint
        divergence=dict(factor=20.0, warmup=10),  # stop when loss/adapter norm > factor x early range (0: off)
        mesh=dict(data=0, fsdp=0),   # device mesh; 0, 0: derived from the device count and the batch
        remat="",                    # gradient checkpointing of UNet blocks: "" | blocks | dots (less memory)
        run_dir="runs/unguide-shapes-arrow",
        overwrite=False,          # run_dir holds another run: replace it (built beside it, swapped in at the end)
        export=[],               # also write the adapter for PyTorch users, e.g. ["peft", "kohya"]
    )
    if preset == "tiny":
        config.update(model="", iterations=4, checkpoint_every=2, keep=2, run_dir="runs/unguide-tiny", transfer="none",
                      lora=dict(config["lora"], init="random"),
                      objective=dict(config["objective"], ddim_steps=4), learning_rate=1e-3)
    elif preset == "sd15-object":
        config.update(model="", concept="cat", run_dir="runs/unguide-sd15-cat", **paper_settings)
    elif preset == "sd15-nudity":
        config.update(model="", concept="nudity", lora=dict(config["lora"], targets="explicit", init="random"),
                      run_dir="runs/unguide-sd15-nudity", transfer="none")
    elif preset == "paper":
        config.update(run_dir="runs/unguide-paper-shapes-arrow", **paper_settings)
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, paper, tiny, sd15-object, sd15-nudity)")
    return config
