"""UnGuide LoRA training. Each preset lists only what differs from the settings' defaults
(``unguide_jax.training.config.UnguideTrainConfig``: ``unguide-train --help`` prints every key). Presets:
  default      erase the arrow from the embedded shapes model: the paper's settings transferred to this model by
               the kv_scale rule, A initialised along the concept
  paper        the paper's settings exactly: lr 3e-5 untransferred, random A, the authors' timesteps
  tiny         tests (give --config.model)
  sd15-object  erase "cat" from an SD 1.x folder, the paper's settings
  sd15-nudity  explicit content, ESD-u-style targets, from an SD 1.x folder
  many         the ten shapes classes in one run: ten LoRAs trained together in one jitted step, each the LoRA
               its own default run trains (runs/unguide-many/concepts/<class>/, and concepts.safetensors)
  embedded-nudity  explicit content on the embedded model, ESD-u-style targets (evaluate.py:robustness-i2p)
  sdxl-object  erase "cat" from an SDXL base folder or single file: the paper's settings, bf16 weights and compute,
               remat (one 80 GB device; add mesh.fsdp to shard the base weights)

python train.py --config configs/unguide.py
python train.py --config configs/unguide.py --config.concept=shapes-star --config.run_dir=runs/unguide-star
python train.py --config configs/unguide.py:sd15-object --config.model=/path/to/stable-diffusion-v1-4
python train.py --config configs/unguide.py --config.resume=true      # continue from the latest checkpoint
python train.py --config configs/unguide.py:many --config.concepts='["shapes-arrow", "shapes-star"]'
"""

# The paper's LoRA as its code runs it: its learning rate as given (no transfer), A ~ N(0, 1/r) (std 1/√r).
PAPER_LORA = dict(transfer="none", lora=dict(init="random"))
# ... trained on the ESD timestep scheme the authors' code inherits (our default, "corrected", is a deviation).
PAPER_OBJECTIVE = dict(timestep_mode="reference")
PAPER = dict(PAPER_LORA, objective=PAPER_OBJECTIVE)
SHAPES_CLASSES = [f"shapes-{c}" for c in ("arrow", "circle", "crescent", "cross", "diamond", "heart", "ring", "square",
                                          "star", "triangle")]


def get_config(preset: str = "default") -> dict:
    presets = {
        "default": dict(method="unguide"),
        "paper": dict(method="unguide", run_dir="runs/unguide-paper-shapes-arrow", **PAPER),
        "tiny": dict(method="unguide", model="", iterations=4, checkpoint_every=2, keep=2, run_dir="runs/unguide-tiny",
                     objective=dict(ddim_steps=4), learning_rate=1e-3, **PAPER_LORA),
        "sd15-object": dict(method="unguide", model="", concept="cat", run_dir="runs/unguide-sd15-cat", **PAPER),
        "many": dict(method="unguide", concepts=SHAPES_CLASSES, run_dir="runs/unguide-many"),
        "sdxl-object": dict(method="unguide", model="", concept="cat", run_dir="runs/unguide-sdxl-cat", dtype="bfloat16",
                            param_dtype="bfloat16", remat="blocks", **PAPER),
        "embedded-nudity": dict(method="unguide", concept="nudity", run_dir="runs/unguide-embedded-nudity",
                                lora=dict(targets="explicit")),
        "sd15-nudity": dict(method="unguide", model="", concept="nudity", run_dir="runs/unguide-sd15-nudity",
                            transfer="none", lora=dict(targets="explicit", init="random"),
                            objective=PAPER_OBJECTIVE),
    }
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(presets)})")
    return presets[preset]
