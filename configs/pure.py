"""PURE (spec erasers.md §2): closed-form K/V projectors from cross-attention activations. Presets: default
(erase the arrow from the embedded shapes model), tiny (tests: give --config.model), sd15-object.

python train.py --config configs/pure.py
python train.py --config configs/pure.py --config.concept=shapes-star --config.run_dir=runs/pure-shapes-star
"""


def get_config(preset: str = "default") -> dict:
    config = dict(
        method="pure",
        model="embedded",
        concept="shapes-arrow",       # forget / retain anchors from the concept file
        pure=dict(
            steps=5,                  # DDIM steps of the collection trajectory
            latents=4,                # x_T per anchor
            guidance_scale=7.5,
            energy=0.9,               # τ, cumulative energy kept per subspace
            edit_keys=True,           # E on to_k too
            center=False,
            per_head=True,            # block-diagonal E: the V edit acts exactly as h -> E h
            seed=0,
            anchor_chunk=16,
        ),
        dtype="float32",
        param_dtype="float32",
        allow_pickle=False,
        run_dir="runs/pure-shapes-arrow",
        export=["peft", "partial_unet"],
    )
    if preset == "tiny":
        config.update(model="", run_dir="runs/pure-tiny", pure=dict(config["pure"], steps=2, latents=2))
    elif preset == "sd15-object":
        config.update(model="", concept="cat", run_dir="runs/pure-sd15-cat")
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, tiny, sd15-object)")
    return config
