"""Erasure evaluation on the embedded shapes model (the protocol of the UnGuide paper's Table 1). Each preset lists
only what differs from the settings' defaults (``unguide_jax.evaluation.config``: EvaluateConfig, I2PConfig).
Presets:
  default      base, LoRA only and UnGuide for the arrow, as erased by `python train.py --config configs/unguide.py`
  all-classes  the paper's Table 1 on the ten classes: base, LoRA only, UnGuide (paper settings and rule), UnGuide
               (defaults), oracle w; trains the missing LoRAs first (runs/unguide-shapes-<class>,
               runs/unguide-paper-shapes-<class>)
  compare      every eraser on the arrow: UnGuide, LoRA only, learnable prompts, PURE, UCE, UnGuidance over
               PURE, with paraphrase leakage and the prefix-token attack (runs of configs/{unguide,
               learnable_prompts,pure,uce}.py); PURE's and UCE's retain prompts are the evaluated other classes
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

from unguide_jax.evaluation.config import ORACLE_ROW, UNGUIDE_TABLE_ROWS

METHODS = list(UNGUIDE_TABLE_ROWS)  # base model, LoRA only, UnGuide
# The paper as its code runs it: the LoRA of configs/unguide.py:paper, the probe's threshold D("") and the ESD
# timesteps the authors' probe inherits.
PAPER = dict(name="UnGuide (paper settings and rule)", edit="unguide_paper", mode="unguide", rule="paper",
             timestep_mode="reference")


def get_config(preset: str = "default") -> dict:
    if preset == "default":
        return dict(job="evaluate")
    if preset == "i2p":
        return dict(job="i2p")
    if preset == "all-classes":
        from unguide_jax.shapes.data import CLASSES

        return dict(
            job="evaluate",
            erasures=[dict(concept=f"shapes-{c}", edits=dict(unguide=[f"runs/unguide-shapes-{c}"],
                                                             unguide_paper=[f"runs/unguide-paper-shapes-{c}"]))
                      for c in CLASSES],
            methods=[METHODS[0], METHODS[1], PAPER, dict(METHODS[2], name="UnGuide (defaults)"), ORACLE_ROW],
            train_missing=dict(unguide="configs/unguide.py", unguide_paper="configs/unguide.py:paper"),
            out_dir="runs/evaluate-all-classes")
    if preset == "compare":
        return dict(
            job="evaluate",
            erasures=[dict(concept="shapes-arrow", edits=dict(
                unguide=["runs/unguide-shapes-arrow"],
                learnable_prompts=["runs/learnable-prompts-shapes-arrow/edit.safetensors"],
                pure=["runs/pure-shapes-arrow"], uce=["runs/uce-shapes-arrow"]))],
            # PURE and UCE protect their concepts' retain prompts, which are the other classes this table
            # scores: their Acc_s is measured on what they were told to keep, the LoRA's is not.
            methods=METHODS + [dict(name="learnable prompts", edit="learnable_prompts", mode="adapter"),
                               dict(name="PURE (retains the evaluated classes)", edit="pure", mode="adapter"),
                               dict(name="UCE (retains the evaluated classes)", edit="uce", mode="adapter"),
                               dict(name="UnGuidance over PURE (retains the evaluated classes)", edit="pure",
                                    mode="unguide")],
            paraphrases=True, attack=dict(enabled=True), out_dir="runs/evaluate-compare")
    if preset == "tiny":
        return dict(job="evaluate", images_per_prompt=2, num_steps=4, batch_size=13,
                    probe=dict(draws=2, ddim_steps=10, t_enc=7), out_dir="runs/evaluate-tiny")
    raise ValueError(f"unknown preset {preset!r} (default, all-classes, compare, tiny, i2p)")
