"""The embedded shapes model's recipe settings (``configs/embedded.py``), one class per stage."""
from __future__ import annotations

import dataclasses

from unguide_jax.diffusion.schedulers import PREDICTION_TYPES
from unguide_jax.settings import (
    Config,
    InvalidValue,
    at_least,
    non_negative,
    option,
    positive,
)
from unguide_jax.shapes import data as shapes_data

RECIPE_STAGES = ("tokenizer", "evaluator", "vae", "vae_decoder", "text_encoder", "diffusion", "quality")


@dataclasses.dataclass(frozen=True)
class TokenizerSettings(Config):
    bpe_file: str = option("", 'the CLIP BPE merges file ("": the one inside open_clip\'s wheel)')
    max_length: int = option(77, "tokens per prompt", check=at_least(3))


@dataclasses.dataclass(frozen=True)
class EvaluatorSettings(Config):
    channels: tuple[int, ...] = option((16, 32, 64, 128), "the classifier's channels per stage")
    steps: int = option(2000, "training steps", check=non_negative)
    batch_size: int = option(128, "images per step", check=positive)
    learning_rate: float = option(2e-3, "peak learning rate", check=positive)
    data_seed: int = option(101, "seed of the training images")
    eval_seed: int = option(102, "seed of the held-out images")
    eval_images: int = option(5000, "held-out images scored", check=positive)
    blur_sigma_max: float = option(1.5, "training images get a Gaussian blur up to this sigma", check=non_negative)


@dataclasses.dataclass(frozen=True)
class VaeSettings(Config):
    block_out_channels: tuple[int, ...] = option((16, 32), "channels per block (one downsampling by 2 per extra block)")
    layers_per_block: int = option(1, "resnets per block", check=positive)
    latent_channels: int = option(8, "latent channels", check=positive)
    norm_num_groups: int = option(8, "GroupNorm groups", check=positive)
    steps: int = option(1500, "training steps", check=non_negative)
    batch_size: int = option(32, "images per step", check=positive)
    learning_rate: float = option(2e-3, "peak learning rate", check=positive)
    warmup: int = option(50, "warmup steps", check=non_negative)
    kl_weight: float = option(1e-6, "weight of the KL term", check=non_negative)
    data_seed: int = option(201, "seed of the training images")


@dataclasses.dataclass(frozen=True)
class VaeDecoderSettings(Config):
    steps: int = option(1500, "decoder tuning steps (encoder frozen)", check=non_negative)
    batch_size: int = option(64, "images per step", check=positive)
    learning_rate: float = option(1e-3, "peak learning rate", check=positive)
    warmup: int = option(50, "warmup steps", check=non_negative)
    data_seed: int = option(202, "seed of the training images")
    layouts: tuple[str, ...] = option(("centred", "wide"), "image layouts drawn in turn")
    eval_seed: int = option(203, "seed of the round-trip images")
    eval_images: int = option(3000, "round-trip images scored by the evaluator", check=positive)
    eval_layout: str = option("centred", "layout of the round-trip images", choices=tuple(shapes_data.LAYOUTS))

    def validate(self) -> None:
        unknown = [layout for layout in self.layouts if layout not in shapes_data.LAYOUTS]
        if unknown:
            raise InvalidValue("layouts", f"has unknown layouts {unknown}; known: {sorted(shapes_data.LAYOUTS)}")


@dataclasses.dataclass(frozen=True)
class TextEncoderSettings(Config):
    hidden_size: int = option(64, "width", check=positive)
    intermediate_size: int = option(256, "MLP width", check=positive)
    num_hidden_layers: int = option(3, "layers", check=positive)
    num_attention_heads: int = option(4, "attention heads", check=positive)
    steps: int = option(400, "pretraining steps (on every caption), then frozen", check=non_negative)
    batch_size: int = option(128, "captions per step", check=positive)
    learning_rate: float = option(1e-3, "peak learning rate", check=positive)
    warmup: int = option(50, "warmup steps", check=non_negative)


@dataclasses.dataclass(frozen=True)
class UnetSettings(Config):
    block_out_channels: tuple[int, ...] = option((16, 32, 64), "channels per block")
    attention_heads: tuple[int, ...] = option((1, 2, 4), "attention heads per block")
    layers_per_block: int = option(1, "resnets per block", check=positive)
    norm_num_groups: int = option(8, "GroupNorm groups", check=positive)


@dataclasses.dataclass(frozen=True)
class DiffusionSettings(Config):
    steps: int = option(2500, "UNet training steps", check=non_negative)
    batch_size: int = option(64, "latents per step", check=positive)
    learning_rate: float = option(1e-3, "peak learning rate", check=positive)
    warmup: int = option(200, "warmup steps", check=non_negative)
    ema_decay: float = option(0.999, "EMA decay of the shipped weights")
    caption_dropout: float = option(0.1, "share of captions dropped (for CFG)")
    train_images: int = option(60000, "training images (encoded once)", check=positive)
    data_seed: int = option(301, "seed of the training images")
    synonym_prob: float = option(0.3, "chance a caption names its class by a synonym")
    layout: str = option("centred", "image layout", choices=tuple(shapes_data.LAYOUTS))
    prediction_type: str = option("epsilon", "what the UNet predicts", choices=PREDICTION_TYPES)
    loss_weighting: str = option("none", "none | min_snr (Min-SNR-γ)", choices=("none", "min_snr"))
    min_snr_gamma: float = option(5.0, "γ of min_snr", check=positive)
    init_unet: str = option("", 'a UNet folder to start from ("": random weights)')
    class_weights: dict[str, float] = option({}, "a class's relative share of the images (unnamed: 1; {}: the stream "
                                                 "as drawn)")

    def validate(self) -> None:
        try:
            shapes_data.class_weight_vector(self.class_weights)
        except ValueError as err:
            raise InvalidValue("class_weights", f": {err}") from None


@dataclasses.dataclass(frozen=True)
class QualitySettings(Config):
    images_per_prompt: int = option(32, "images per class prompt of the quality gate", check=positive)
    style_images_per_prompt: int = option(8, "images per style prompt", check=positive)
    num_steps: int = option(50, "DDIM steps", check=positive)
    guidance_scale: float = option(7.5, "CFG scale")
    seed: int = option(1000, "first seed")
    batch_size: int = option(128, "images per jitted call", check=positive)


@dataclasses.dataclass(frozen=True)
class RecipeConfig(Config):
    """The embedded shapes model's pretraining recipe (configs/embedded.py)."""

    seed: int = option(0, "the recipe's seed (each stage offsets it)")
    work_dir: str = option("runs/embedded-recipe", "stage outputs, recipe.json, metrics.jsonl; finished stages are "
                                                   "skipped on a rerun")
    publish: bool = option(False, "copy the finished run over the shipped one in unguide_jax/assets/")
    image_size: int = option(32, "image side in pixels", check=positive)
    checkpoint_every: int = option(250, "the VAE and diffusion loops save their state this often (resumable)",
                                   check=non_negative)
    reuse_from: str = option("", "another run's work_dir: its finished stages made with the same settings are copied")
    stages: tuple[str, ...] = option(("tokenizer", "evaluator", "vae", "text_encoder", "diffusion", "quality"),
                                     f"stages to run, of {', '.join(RECIPE_STAGES)}")
    tokenizer: TokenizerSettings = option(TokenizerSettings(), "the CLIP tokenizer")
    evaluator: EvaluatorSettings = option(EvaluatorSettings(), "the shapes classifier (class and style heads)")
    vae: VaeSettings = option(VaeSettings(), "the VAE")
    vae_decoder: VaeDecoderSettings = option(VaeDecoderSettings(), "the decoder tuned on with the encoder frozen "
                                                                   "(a stage only when stages names it)")
    text_encoder: TextEncoderSettings = option(TextEncoderSettings(), "the text encoder, pretrained then frozen")
    unet: UnetSettings = option(UnetSettings(), "the UNet's architecture")
    diffusion: DiffusionSettings = option(DiffusionSettings(), "the UNet's training")
    quality: QualitySettings = option(QualitySettings(), "the quality gate")

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in RECIPE_STAGES]
        if unknown:
            raise InvalidValue("stages", f": unknown recipe stages {unknown}; known: {list(RECIPE_STAGES)}")
