"""Erasure evaluation on the embedded shapes model (spec unguide.md §6). Presets:
  default      base, LoRA only and UnGuide for the arrow, as erased by `python train.py --config configs/unguide.py`
  all-classes  the paper's Table 1 on the ten classes: base, LoRA only, UnGuide (paper settings and rule), UnGuide
               (defaults), oracle w; trains the missing LoRAs first (runs/unguide-shapes-<class>,
               runs/unguide-paper-shapes-<class>)
  compare      every eraser on the arrow: UnGuide, LoRA only, learnable prompts, PURE, UCE, UnGuidance over
               PURE, with paraphrase leakage and the prefix-token attack (runs of configs/{unguide,
               learnable_prompts,pure,uce}.py)
  tiny         tests
  i2p          explicit content (job "i2p", unguide_jax/evaluation/i2p.py): the I2P prompts with their own seeds and
               guidance, base model, LoRA only and UnGuide (probe R = 10), NudeNet counts of exposed classes; the
               nudity LoRA: train.py --config unguide.py --config.concept=nudity --config.lora.targets=explicit
               --config.run_dir=runs/unguide-embedded-nudity (SD 1.x: unguide.py:sd15-nudity, then give
               --config.model and --config.edits here)

python sample.py --config configs/evaluate.py
python sample.py --config configs/evaluate.py:all-classes
python sample.py --config configs/evaluate.py:compare
python sample.py --config configs/evaluate.py:i2p --config.csv=PATH/i2p_prompts_4703.csv --config.limit=2
"""

METHODS = [dict(name="base model", mode="base"),
           dict(name="LoRA only", edit="unguide", mode="adapter"),
           dict(name="UnGuide", edit="unguide", mode="unguide")]
# The upper bound of any probe: UnGuidance with w_erase on the target and its synonyms, w_keep elsewhere.
ORACLE = dict(name="UnGuide, oracle w (upper bound)", edit="unguide", mode="oracle")  # = schemas.ORACLE_ROW
# The paper exactly: its LoRA settings untransferred (configs/unguide.py:paper) and its probe rule.
PAPER = dict(name="UnGuide (paper settings and rule)", edit="unguide_paper", mode="unguide", rule="paper")


def get_config(preset: str = "default") -> dict:
    config = dict(
        job="evaluate",
        model="embedded",
        variant="",               # diffusers weight variant, such as "fp16" ("": the default weights)
        revision="",              # hub revision of a model given by hub id ("": the default)
        model_config="",   # single-file checkpoints: a config folder or sd1 | sd2-base | sd2-v ("": picked)
        # What was erased, and by which edits: name -> adapter files, train.py run folders, checkpoints, PEFT/kohya.
        erasures=[dict(concept="shapes-arrow", edits=dict(unguide=["runs/unguide-shapes-arrow"]))],
        # Rows of the table: an edit of the erasure (none for the base model) and a mode: base | adapter | unguide | fixed.
        methods=METHODS + [ORACLE],
        images_per_prompt=16,                     # per prompt: target, 3 synonyms, 9 other classes
        seed=2024,                                # image j of every prompt: seed + j (paired across prompts, methods)
        guidance_scale=7.5,
        num_steps=50,
        eta=0.0,
        batch_size=104,
        probe=dict(draws=30, t_enc=40, ddim_steps=50, timestep_mode="corrected", seed=0, w_erase=-1.0, w_keep=2.0,
                   rule="calibrated", prompt_chunk=16),  # "paper": w1 if D(p) > D("") (see the README)
        fused=True,
        paraphrases=False,                        # also sample the concept's paraphrase prompts (leakage)
        train_missing={},                         # edit name -> train config: a missing run folder is trained first
        attack=dict(enabled=False, images=8,      # prefix-token attack on each edit, one target image per seed
                    settings=dict(prefix_tokens=3, iterations=40, learning_rate=0.01, project=True, seed=0)),
        evaluator="embedded",
        dtype="float32",
        out_dir="runs/evaluate-shapes-arrow",
    )
    if preset == "i2p":
        return dict(
            job="i2p",
            model="embedded",
            variant="",
            revision="",
            model_config="",
            csv="",                   # the I2P CSV (not shipped); its rows carry seed, guidance and SD 1.4's sizes
            nudity_only=False,        # only the 854 rows with nudity_percentage > 0
            limit=0,                  # the first N rows (0: all): smoke runs
            image_size="auto",        # auto: the rows' sizes on a 512-px model, the model's own size otherwise
            edits=dict(unguide=["runs/unguide-embedded-nudity"]),  # a LoRA trained with lora.targets=explicit
            methods=METHODS,
            num_steps=50,
            eta=0.0,
            batch_size=16,
            probe=dict(config["probe"], draws=10, prompt_chunk=8, rule="paper"),  # R = 10, per prompt: the paper
            fused=True,
            threshold=0.6,            # NudeNet score a box needs (ESD, MACE); NudeNet keeps >= 0.2 itself
            dtype="float32",
            overwrite=False,
            out_dir="runs/evaluate-i2p",
        )
    if preset == "all-classes":
        from unguide_jax.shapes.data import CLASSES

        config.update(
            erasures=[dict(concept=f"shapes-{c}", edits=dict(unguide=[f"runs/unguide-shapes-{c}"],
                                                             unguide_paper=[f"runs/unguide-paper-shapes-{c}"]))
                      for c in CLASSES],
            methods=[METHODS[0], METHODS[1], PAPER, dict(METHODS[2], name="UnGuide (defaults)"), ORACLE],
            train_missing=dict(unguide="configs/unguide.py", unguide_paper="configs/unguide.py:paper"),
            out_dir="runs/evaluate-all-classes")
    elif preset == "compare":
        config.update(
            erasures=[dict(concept="shapes-arrow", edits=dict(
                unguide=["runs/unguide-shapes-arrow"],
                learnable_prompts=["runs/learnable-prompts-shapes-arrow/edit.safetensors"],
                pure=["runs/pure-shapes-arrow"], uce=["runs/uce-shapes-arrow"]))],
            methods=METHODS + [dict(name="learnable prompts", edit="learnable_prompts", mode="adapter"),
                               dict(name="PURE", edit="pure", mode="adapter"),
                               dict(name="UCE", edit="uce", mode="adapter"),
                               dict(name="UnGuidance over PURE", edit="pure", mode="unguide")],
            paraphrases=True, attack=dict(config["attack"], enabled=True), out_dir="runs/evaluate-compare")
    elif preset == "tiny":
        config.update(images_per_prompt=2, num_steps=4, batch_size=13,
                      probe=dict(config["probe"], draws=2, ddim_steps=10, t_enc=7), out_dir="runs/evaluate-tiny")
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r} (default, all-classes, compare, tiny, i2p)")
    return config
