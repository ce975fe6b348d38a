"""Pretraining stages of the embedded shapes model: VAE, text encoder, then the UNet on a frozen text encoder.

Every stage is a function of a config dict and returns parameters and metrics; ``recipe.py`` chains
them, writes their outputs, and skips stages whose outputs already exist (so the recipe resumes).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import safe_open
from tqdm import tqdm

from unguide_jax.diffusion.schedulers import (
    NoiseSchedule,
    SchedulerConfig,
    add_noise,
    training_target,
)
from unguide_jax.loading.diffusers_folder import build_module
from unguide_jax.loading.weights import read_safetensors, write_safetensors
from unguide_jax.models.text_encoder import CLIPTextConfig
from unguide_jax.models.unet import UNetConfig
from unguide_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    sample_posterior,
    scale_latents,
)
from unguide_jax.shapes import data as shapes
from unguide_jax.shapes.classifier import accuracy_by_group

Log = Callable[[dict], None]


def vae_config(cfg: dict, image_size: int) -> VAEConfig:
    n = len(cfg["block_out_channels"])
    return VAEConfig(block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
                     latent_channels=cfg["latent_channels"], norm_num_groups=cfg["norm_num_groups"],
                     down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                     sample_size=image_size, scaling_factor=1.0)


def text_config(cfg: dict, vocab_size: int, max_length: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                          num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                          max_position_embeddings=max_length, hidden_act="quick_gelu",
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def unet_config(cfg: dict, latent_size: int, latent_channels: int, cross_attention_dim: int) -> UNetConfig:
    n = len(cfg["block_out_channels"])
    return UNetConfig(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                      block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
                      attention_head_dim=tuple(cfg["attention_heads"]), norm_num_groups=cfg["norm_num_groups"],
                      cross_attention_dim=cross_attention_dim,
                      down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))


class LoopCheckpoint:
    """A training loop's whole state (a pytree of arrays plus JSON metadata) in one safetensors file.

    Written atomically every ``every`` steps, so a stage cut off midway resumes where it stopped and
    ends with the same weights as an uninterrupted run. ``path=None`` turns checkpointing off.
    """

    def __init__(self, path: str | Path | None, every: int):
        self.path, self.every = (Path(path) if path else None), max(1, int(every))

    def due(self, step: int, total: int) -> bool:
        return self.path is not None and (step + 1) % self.every == 0 and step + 1 < total

    def save(self, tree: Any, meta: dict) -> None:
        leaves = jax.tree.leaves(jax.device_get(tree))
        write_safetensors(self.path, {f"{i:06d}": np.asarray(x) for i, x in enumerate(leaves)},
                          metadata={"meta": json.dumps(meta)})

    def load(self, like: Any) -> tuple[Any, dict] | None:
        """The saved state in the structure of ``like`` (same shapes and dtypes), or None if there is none."""
        if self.path is None or not self.path.is_file():
            return None
        with safe_open(str(self.path), "np") as f:
            meta = json.loads(f.metadata()["meta"])
        stored = read_safetensors(self.path)
        leaves, treedef = jax.tree.flatten(like)
        if len(stored) != len(leaves):
            raise ValueError(f"{self.path} holds {len(stored)} arrays, the loop has {len(leaves)}: "
                             "it was written by another configuration; delete it")
        restored = []
        for i, leaf in enumerate(leaves):
            array = stored[f"{i:06d}"]
            if array.size == np.size(leaf):
                array = array.reshape(np.shape(leaf))  # safetensors stores scalars with shape (1,)
            if array.shape != np.shape(leaf) or array.dtype != np.asarray(leaf).dtype:
                raise ValueError(f"{self.path}: array {i} is {array.dtype}{array.shape}, expected "
                                 f"{np.asarray(leaf).dtype}{np.shape(leaf)}; delete the checkpoint")
            restored.append(array)
        return jax.tree.unflatten(treedef, restored), meta

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def to_pixels(images_uint8: np.ndarray) -> jax.Array:
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def _adam(lr: float, steps: int, warmup: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), end_value=lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def train_vae(cfg: dict, image_size: int, seed: int, log: Log,
              checkpoint: LoopCheckpoint | None = None) -> tuple[VAEConfig, dict, dict]:
    """AutoencoderKL on fresh procedural images: L1 + L2 reconstruction + a small KL term (as SD's VAE)."""
    config = vae_config(cfg, image_size)
    vae = AutoencoderKL(config)
    params = jax.jit(vae.init)(jax.random.key(seed), *vae.init_inputs())["params"]
    params, metrics = _fit_vae(vae, params, frozen=(), cfg=cfg, layouts=("wide",), image_size=image_size,
                               key=jax.random.key(seed + 1), log=log, stage="vae", checkpoint=checkpoint)
    return config, params, metrics


# What a decoder fine-tune leaves as it was: everything that makes the latents.
ENCODER_PARTS = ("encoder", "quant_conv")


def train_decoder(cfg: dict, vae: AutoencoderKL, params: dict, image_size: int, seed: int, log: Log,
                  checkpoint: LoopCheckpoint | None = None) -> tuple[dict, dict]:
    """The VAE's decoder (and post_quant_conv) trained on with the encoder frozen, on the reconstruction
    loss of posterior samples, over images drawn in each of ``cfg["layouts"]`` in turn.

    The latents stay bit-identical, so a UNet trained on them (before or after) fits the tuned VAE as it
    fitted the old one; only how latents become pixels improves."""
    missing = [part for part in ENCODER_PARTS if part not in params]
    if missing:
        raise ValueError(f"the VAE params lack {missing}: not an AutoencoderKL's parameters")
    params = jax.tree.map(jnp.asarray, params)
    return _fit_vae(vae, params, frozen=ENCODER_PARTS, cfg=dict(cfg, kl_weight=0.0), layouts=tuple(cfg["layouts"]),
                    image_size=image_size, key=jax.random.key(seed), log=log, stage="vae_decoder",
                    checkpoint=checkpoint)


def _fit_vae(vae: AutoencoderKL, params: dict, *, frozen: tuple[str, ...], cfg: dict, layouts: tuple[str, ...],
             image_size: int, key: jax.Array, log: Log, stage: str,
             checkpoint: LoopCheckpoint | None) -> tuple[dict, dict]:
    """The VAE loop: the top-level parameter groups named in ``frozen`` are held fixed, the others are
    trained on L1 + L2 + ``kl_weight`` · KL; step i draws its batch in ``layouts[i % len(layouts)]``."""
    checkpoint = checkpoint or LoopCheckpoint(None, 1)
    fixed = {name: tree for name, tree in params.items() if name in frozen}
    trained = {name: tree for name, tree in params.items() if name not in frozen}
    optimizer = _adam(cfg["learning_rate"], cfg["steps"], cfg["warmup"])
    opt_state = optimizer.init(trained)

    def loss_fn(p, x, key):
        p = {**fixed, **p}
        mean, logvar = vae.apply({"params": p}, x, method=AutoencoderKL.encode)
        z = sample_posterior(mean, logvar, jax.random.normal(key, mean.shape))
        rec = vae.apply({"params": p}, z, method=AutoencoderKL.decode)
        kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        l1, l2 = jnp.abs(rec - x).mean(), ((rec - x) ** 2).mean()
        return l1 + l2 + cfg["kl_weight"] * kl, (l1, l2, kl)

    @jax.jit
    def step(p, s, x, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, aux

    started, losses, first = time.perf_counter(), [], 0
    resumed = checkpoint.load((trained, opt_state, jax.random.key_data(key)))
    if resumed is not None:
        (trained, opt_state, key_data), meta = resumed
        key, losses, first = jax.random.wrap_key_data(key_data), meta["losses"], meta["step"]
        log({"stage": stage, "resumed_at": first})
    bar = tqdm(range(first, cfg["steps"]), desc=stage.replace("_", " "), mininterval=5, initial=first,
               total=cfg["steps"])
    for i in bar:
        images, *_ = shapes.batch(cfg["data_seed"], i * cfg["batch_size"], cfg["batch_size"], image_size,
                                  layout=layouts[i % len(layouts)])
        key, sub = jax.random.split(key)
        trained, opt_state, loss, (l1, l2, kl) = step(trained, opt_state, to_pixels(images), sub)
        losses.append(float(loss))
        if i % 50 == 0 or i == cfg["steps"] - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
            log({"stage": stage, "step": i, "loss": float(loss), "l1": float(l1), "l2": float(l2), "kl": float(kl)})
        if checkpoint.due(i, cfg["steps"]):
            checkpoint.save((trained, opt_state, jax.random.key_data(key)), {"step": i + 1, "losses": losses})
    window = max(1, min(20, len(losses) // 4))
    metrics = {"train_seconds": round(time.perf_counter() - started, 1), "first_loss": float(np.mean(losses[:window])),
               "final_loss": float(np.mean(losses[-window:])), "loss_window": window}
    return {**fixed, **trained}, metrics


def round_trip_accuracy(vae: AutoencoderKL, params: dict, evaluator, images: np.ndarray, labels: np.ndarray,
                        styles: np.ndarray, batch_size: int = 500) -> dict:
    """How often the evaluator still sees the drawn class after encode (posterior mean) and decode, in all
    and per style: the ceiling the VAE puts on any image the UNet generates."""
    round_trip = jax.jit(lambda p, x: vae.apply(
        {"params": p}, vae.apply({"params": p}, x, method=AutoencoderKL.encode)[0], method=AutoencoderKL.decode))
    decoded = np.concatenate([np.asarray(round_trip(params, to_pixels(images[i:i + batch_size])))
                              for i in range(0, len(images), batch_size)])
    predicted, _ = evaluator.predict(np.clip((decoded + 1.0) * 127.5, 0, 255).round().astype(np.uint8))
    correct = predicted == labels
    return {"class_accuracy": float(correct.mean()),
            "per_style": accuracy_by_group(correct, styles, shapes.STYLES),
            "per_class": accuracy_by_group(correct, labels, shapes.CLASSES)}


def encode_dataset(vae: AutoencoderKL, params, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and log-variance of every image (the diffusion stage samples from them)."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
    means, logvars = [], []
    for start in range(0, len(images), batch_size):
        mean, logvar = encode(params, to_pixels(images[start:start + batch_size]))
        means.append(np.asarray(mean))
        logvars.append(np.asarray(logvar))
    return np.concatenate(means), np.concatenate(logvars)


def latent_scaling_factor(means: np.ndarray, logvars: np.ndarray) -> float:
    """1 / std of the sampled latents (how SD's 0.18215 was chosen)."""
    second_moment = np.mean(means.astype(np.float64) ** 2 + np.exp(logvars.astype(np.float64)))
    return float(1.0 / np.sqrt(second_moment - np.mean(means, dtype=np.float64) ** 2))


def tokenize_captions(tokenizer, captions: list[str]) -> np.ndarray:
    """Token ids for many captions, tokenizing each distinct caption once."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    table = dict(zip(unique, ids))
    return np.asarray([table[c] for c in captions], np.int32)


def all_captions() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every caption the data set can write, with its class and named style (len(STYLES) if none is named)."""
    captions, labels, styles = [], [], []
    for label, cls in enumerate(shapes.CLASSES):
        for name in (cls, *shapes.SYNONYMS[cls]):
            for style in (None, *range(len(shapes.STYLES))):
                noun = name if style is None else f"{shapes.STYLES[style]} {name}"
                for template in shapes.TEMPLATES:
                    captions.append(shapes.article_fix(template.format(noun)))
                    labels.append(label)
                    styles.append(len(shapes.STYLES) if style is None else style)
    return captions, np.asarray(labels), np.asarray(styles)


def train_text_encoder(cfg: dict, text_cfg: CLIPTextConfig, tokenizer, seed: int, log: Log) -> tuple[dict, dict]:
    """The CLIP-architecture text encoder, taught what captions mean before the UNet sees it.

    Real Stable Diffusion conditions on a frozen, pretrained CLIP; a text encoder trained from
    scratch together with a small UNet stayed nearly constant across prompts (the UNet learned to
    ignore it). So, in CLIP's role, it first learns to tell captions apart: linear heads read the
    class and the named style from every position from EOS on (those positions see the whole
    caption through the causal mask, and the UNet attends to all of them). Synonyms share their
    class's label, so they land near it.
    """
    captions, labels, styles = all_captions()
    ids = tokenize_captions(tokenizer, captions)
    eos_pos = np.argmax(ids == text_cfg.eos_token_id, axis=-1)
    after_eos = (np.arange(ids.shape[1])[None, :] >= eos_pos[:, None]).astype(np.float32)
    encoder = build_module("text_encoder", text_cfg)
    k_enc, k_heads = jax.random.split(jax.random.key(seed))
    heads = {"class": 0.02 * jax.random.normal(k_heads, (text_cfg.hidden_size, len(shapes.CLASSES))),
             "style": 0.02 * jax.random.normal(jax.random.fold_in(k_heads, 1), (text_cfg.hidden_size, len(shapes.STYLES) + 1))}
    params = {"text_encoder": jax.jit(encoder.init)(k_enc, *encoder.init_inputs())["params"], "heads": heads}
    optimizer = _adam(cfg["learning_rate"], cfg["steps"], cfg["warmup"])
    opt_state = optimizer.init(params)

    def predictions(p, ids_batch):
        hidden, _ = encoder.apply({"params": p["text_encoder"]}, ids_batch)
        return hidden @ p["heads"]["class"], hidden @ p["heads"]["style"]

    def loss_fn(p, ids_batch, mask, label, style):
        class_logits, style_logits = predictions(p, ids_batch)
        per_token = (optax.softmax_cross_entropy_with_integer_labels(class_logits, label[:, None])
                     + optax.softmax_cross_entropy_with_integer_labels(style_logits, style[:, None]))
        return jnp.sum(per_token * mask) / jnp.sum(mask)

    @jax.jit
    def step(p, s, ids_batch, mask, label, style):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids_batch, mask, label, style)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng, started, losses = np.random.default_rng(seed), time.perf_counter(), []
    bar = tqdm(range(cfg["steps"]), desc="text encoder", mininterval=5)
    for i in bar:
        idx = rng.choice(len(captions), cfg["batch_size"], replace=False)
        params, opt_state, loss = step(params, opt_state, ids[idx], after_eos[idx], labels[idx], styles[idx])
        losses.append(float(loss))
        if i % 50 == 0 or i == cfg["steps"] - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
            log({"stage": "text_encoder", "step": i, "loss": float(loss)})
    class_logits, style_logits = jax.jit(predictions)(params, ids)
    at_eos = lambda logits: np.asarray(jnp.take_along_axis(logits, jnp.asarray(eos_pos)[:, None, None], axis=1)[:, 0])  # noqa: E731
    metrics = {"train_seconds": round(time.perf_counter() - started, 1), "captions": len(captions),
               "first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-10:])),
               "class_accuracy_at_eos": float((at_eos(class_logits).argmax(-1) == labels).mean()),
               "style_accuracy_at_eos": float((at_eos(style_logits).argmax(-1) == styles).mean())}
    return params["text_encoder"], metrics


@dataclasses.dataclass
class DiffusionData:
    latent_mean: np.ndarray  # (N, h, w, c), unscaled VAE latents
    latent_logvar: np.ndarray
    input_ids: np.ndarray  # (N, L)
    empty_ids: np.ndarray  # (L,) ids of "" for classifier-free guidance dropout


def loss_weights(weighting: str, gamma: float, prediction_type: str, schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Per-example loss weights. "min_snr" is Min-SNR-γ (Hang et al. 2023): it caps the weight of the
    nearly clean timesteps, whose fine detail otherwise dominates a small model's gradient while the
    noisy timesteps, where the prompt decides the shape, learn slowly."""
    if weighting == "none":
        return jnp.ones(t.shape, jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss_weighting {weighting!r} (none, min_snr)")
    alpha = schedule.alphas_cumprod[t]
    snr = alpha / (1.0 - alpha)
    capped = jnp.minimum(snr, gamma)
    # The same cap expressed for each target: ε-loss = x0-loss / SNR, v-loss = x0-loss / (SNR + 1).
    return {"epsilon": capped / snr, "v_prediction": capped / (snr + 1.0), "sample": capped}[prediction_type]


def train_diffusion(cfg: dict, unet_cfg: UNetConfig, text_cfg: CLIPTextConfig, vae_cfg: VAEConfig,
                    scheduler: SchedulerConfig, data: DiffusionData, text_params: dict, seed: int, log: Log,
                    checkpoint: LoopCheckpoint | None = None, init_params: dict | None = None):
    """The UNet on the scheduler's objective, conditioned on the frozen pretrained text encoder (as
    Stable Diffusion on CLIP), with an EMA copy; from scratch, or from ``init_params`` (a warm start:
    both the trained and the EMA weights begin there). Returns the EMA UNet params."""
    checkpoint = checkpoint or LoopCheckpoint(None, 1)
    unet, text_encoder = build_module("unet", unet_cfg), build_module("text_encoder", text_cfg)
    k_unet, key = jax.random.split(jax.random.key(seed))
    params = jax.jit(unet.init)(k_unet, *unet.init_inputs(size=unet_cfg.sample_size))["params"]
    if init_params is not None:
        shapes_of = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)
        if shapes_of(params) != shapes_of(init_params):  # nested dicts: names, shapes and dtypes all compared
            raise ValueError("diffusion.init_unet does not fit the recipe's UNet config (parameter names or shapes differ)")
        params = jax.tree.map(jnp.asarray, init_params)
    optimizer = _adam(cfg["learning_rate"], cfg["steps"], cfg["warmup"])
    opt_state = optimizer.init(params)
    ema = params
    schedule = NoiseSchedule.from_config(scheduler)
    text_params = jax.tree.map(jnp.asarray, text_params)
    # The text encoder is frozen and the captions come from a small set (1000 for the shapes data), so
    # each distinct caption is encoded once here instead of in every step.
    distinct_ids, caption_index = np.unique(data.input_ids, axis=0, return_inverse=True)
    caption_index = caption_index.reshape(-1)
    encode = jax.jit(lambda ids: text_encoder.apply({"params": text_params}, ids)[0])
    contexts = jnp.concatenate([encode(jnp.asarray(distinct_ids[i:i + 256])) for i in range(0, len(distinct_ids), 256)])
    empty_context = encode(jnp.asarray(data.empty_ids)[None])[0]
    weighting, gamma = cfg["loss_weighting"], float(cfg["min_snr_gamma"])
    loss_weights(weighting, gamma, scheduler.prediction_type, schedule, jnp.zeros((1,), jnp.int32))  # bad name: fail now

    def loss_fn(p, mean, logvar, context, key):
        k_post, k_noise, k_t, k_drop = jax.random.split(key, 4)
        batch = mean.shape[0]
        x0 = scale_latents(sample_posterior(mean, logvar, jax.random.normal(k_post, mean.shape)), vae_cfg)
        drop = jax.random.uniform(k_drop, (batch, 1, 1)) < cfg["caption_dropout"]
        context = jnp.where(drop, empty_context[None], context)
        noise = jax.random.normal(k_noise, x0.shape)
        t = jax.random.randint(k_t, (batch,), 0, scheduler.num_train_timesteps)
        pred = unet.apply({"params": p}, add_noise(schedule, x0, noise, t), t, context)
        per_example = jnp.mean((pred - training_target(scheduler, schedule, x0, noise, t)) ** 2, axis=(1, 2, 3))
        return jnp.mean(per_example * loss_weights(weighting, gamma, scheduler.prediction_type, schedule, t))

    @jax.jit
    def step(p, s, ema, mean, logvar, contexts, caption_rows, key, i):  # contexts: an argument, not a baked-in constant
        loss, grads = jax.value_and_grad(loss_fn)(p, mean, logvar, contexts[caption_rows], key)
        updates, s = optimizer.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        # The decay warms up so that the random initialisation does not linger in short runs.
        decay = jnp.minimum(cfg["ema_decay"], (1.0 + i) / (10.0 + i))
        ema = jax.tree.map(lambda e, q: decay * e + (1 - decay) * q, ema, p)
        return p, s, ema, loss

    n, bs = len(data.input_ids), cfg["batch_size"]
    order_rng = np.random.default_rng(seed)
    order = order_rng.permutation(n)
    started, losses, cursor, first = time.perf_counter(), [], 0, 0
    resumed = checkpoint.load((params, opt_state, ema, jax.random.key_data(key), order))
    if resumed is not None:
        (params, opt_state, ema, key_data, order), meta = resumed
        key, order = jax.random.wrap_key_data(key_data), np.asarray(order)
        losses, cursor, first = meta["losses"], meta["cursor"], meta["step"]
        order_rng.bit_generator.state = meta["order_rng"]
        log({"stage": "diffusion", "resumed_at": first})
    bar = tqdm(range(first, cfg["steps"]), desc="unet", mininterval=5, initial=first, total=cfg["steps"])
    for i in bar:
        if cursor + bs > n:
            order, cursor = order_rng.permutation(n), 0
        idx = np.sort(order[cursor:cursor + bs])
        cursor += bs
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = step(params, opt_state, ema, data.latent_mean[idx], data.latent_logvar[idx],
                                            contexts, caption_index[idx], sub, jnp.float32(i))
        losses.append(float(loss))
        if i % 50 == 0 or i == cfg["steps"] - 1:
            recent = float(np.mean(losses[-50:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            log({"stage": "diffusion", "step": i, "loss": float(loss), "loss_avg50": recent})
        if checkpoint.due(i, cfg["steps"]):
            checkpoint.save((params, opt_state, ema, jax.random.key_data(key), order),
                            {"step": i + 1, "losses": losses, "cursor": cursor, "order_rng": order_rng.bit_generator.state})
    window = max(1, min(50, len(losses) // 4))
    metrics = {"train_seconds": round(time.perf_counter() - started, 1), "first_loss": float(np.mean(losses[:window])),
               "final_loss": float(np.mean(losses[-window:])), "loss_window": window, "steps": cfg["steps"],
               "batch_size": bs}
    return unet, text_encoder, ema, metrics
