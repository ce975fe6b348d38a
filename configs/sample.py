"""Text-to-image sampling. Presets: default (bring your own model folder), smoke (random tiny model).

python sample.py --config configs/sample.py:smoke
python sample.py --config configs/sample.py --config.model=/path/to/stable-diffusion-v1-5 --config.prompt="a photo of a cat"
"""


def get_config(preset: str = "default") -> dict:
    config = dict(
        model="",                    # diffusers-layout folder (model_index.json, unet/, text_encoder/, ...)
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
        out_dir="runs/sample",
    )
    if preset == "smoke":
        config.update(
            model="runs/smoke-model", create_random_model=True, num_steps=20, images_per_prompt=2,
            prompts=["a photo of the cat", "a photo of the dog", "a striped airplane", "a dotted ship"],
            out_dir="runs/smoke-samples",
        )
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, smoke)")
    return config
