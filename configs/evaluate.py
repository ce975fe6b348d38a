"""Object-erasure evaluation on the embedded shapes model (spec unguide.md §6). Presets: default (the circle,
as erased by `python train.py --config configs/unguide.py`), all-classes (the ten runs of
`configs/unguide.py:shapes-<class>`), tiny (tests).

python sample.py --config configs/evaluate.py
python sample.py --config configs/evaluate.py --config.methods='["base", "adapter", "unguide"]' --config.images_per_prompt=64
"""


def get_config(preset: str = "default") -> dict:
    config = dict(
        job="evaluate",
        model="embedded",
        # What was erased, and by which edits (adapter files, train.py run folders, checkpoints, PEFT/kohya files).
        erasures=[dict(concept="shapes-circle", adapters=["runs/unguide-shapes-circle"])],
        methods=["base", "adapter", "unguide"],   # base | adapter | unguide | fixed
        w=2.0,                                    # method "fixed"
        images_per_prompt=32,                     # per prompt: target, 3 synonyms, 9 other classes
        seed=2024,                                # image j of every prompt: seed + j (paired across prompts, methods)
        guidance_scale=7.5,
        num_steps=50,
        eta=0.0,
        batch_size=104,
        probe=dict(draws=30, t_enc=40, ddim_steps=50, timestep_mode="corrected", seed=0, w_erase=-1.0, w_keep=2.0,
                   rule="paper", prompt_chunk=14),
        fused=True,
        evaluator="embedded",
        dtype="float32",
        out_dir="runs/evaluate-shapes-circle",
    )
    if preset == "all-classes":
        from unguide_jax.data.shapes import CLASSES

        config.update(erasures=[dict(concept=f"shapes-{c}", adapters=[f"runs/unguide-shapes-{c}"]) for c in CLASSES],
                      out_dir="runs/evaluate-all-classes")
    elif preset == "tiny":
        config.update(images_per_prompt=2, num_steps=4, batch_size=13,
                      probe=dict(config["probe"], draws=2, ddim_steps=10, t_enc=7), out_dir="runs/evaluate-tiny")
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, all-classes, tiny)")
    return config
