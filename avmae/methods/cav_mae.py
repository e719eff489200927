"""CAV-MAE's objective: masked reconstruction of both modalities plus audio-visual InfoNCE."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from avmae import flops, losses, masking
from avmae.data.augment import normalize_image
from avmae.models.cav_mae import CAVMAE

Batch = dict[str, jax.Array]


class Method(NamedTuple):
  model: CAVMAE
  init: Callable[[jax.Array, Batch], Any]  # (key, batch) -> boxed variables
  # (params, batch, example keys [B]) -> (loss, metrics)
  loss_fn: Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
  reconstruct: Callable[[Any, Batch, jax.Array], dict[str, jax.Array]]
  train_step_flops: float
  # example keys [B] -> the (audio, video) masks loss_fn draws with them (for peers, e.g. torch)
  masks: Callable[[jax.Array], tuple[masking.Mask, masking.Mask]]


def build(config: ml_collections.ConfigDict) -> Method:
  model = CAVMAE(**config.model, dtype=jnp.dtype(config.dtype))
  cfg_mask, cfg_loss = config.masking, config.loss
  patch = model.patch_size

  def masks(keys: jax.Array) -> tuple[masking.Mask, masking.Mask]:
    """Audio and video masks of the examples with these keys [B]."""
    fold = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    return (masking.make_mask(fold(0), model.num_audio_tokens, cfg_mask.ratio_a,
                              cfg_mask.mode_a, grid=model.audio_grid),
            masking.random_mask(fold(1), model.num_video_tokens, cfg_mask.ratio_v))

  def batch_masks(batch: Batch, key: jax.Array) -> tuple[masking.Mask, masking.Mask]:
    return masks(masking.example_keys(key, batch["audio"].shape[0]))

  def init(key: jax.Array, batch: Batch) -> Any:
    return model.init(key, batch["audio"], normalize_image(batch["frames"]),
                      *batch_masks(batch, key))

  def loss_fn(params: Any, batch: Batch, keys: jax.Array):
    """(params, batch, one key per example) -> (loss, metrics); every term in float32."""
    mask_a, mask_v = masks(keys)
    frames = normalize_image(batch["frames"])  # uint8 from the pipeline
    out = model.apply({"params": params}, batch["audio"], frames, mask_a, mask_v)
    valid = batch["valid"]
    rec_a = losses.reconstruction_loss(out["pred_a"], losses.patchify_audio(batch["audio"], patch),
                                       mask_a.mask, cfg_loss.norm_pix, valid)
    rec_v = losses.reconstruction_loss(out["pred_v"], losses.patchify_image(frames, patch),
                                       mask_v.mask, cfg_loss.norm_pix, valid)
    # Mean-pooled visible tokens after the shared block with modality norms, as official.
    nce, accuracy = losses.contrastive_loss(
        out["latent_a"].mean(axis=1), out["latent_v"].mean(axis=1), cfg_loss.temperature,
        cfg_loss.bidirectional, cfg_loss.group_size or None, valid)
    mae = cfg_loss.mae_weight * (rec_a + rec_v)
    contrastive = cfg_loss.contrastive_weight * nce
    loss = mae + contrastive
    return loss, {"loss": loss, "loss_mae": mae, "loss_mae_a": rec_a, "loss_mae_v": rec_v,
                  "loss_contrastive": contrastive, "contrastive_accuracy": accuracy}

  def reconstruct(params: Any, batch: Batch, key: jax.Array) -> dict[str, jax.Array]:
    """Inputs, masked inputs and reconstructions in input space, for pictures.

    With norm_pix the model predicts normalised patches: they are mapped back with each
    target patch's own mean and std (as MAE visualisations do).
    """
    mask_a, mask_v = batch_masks(batch, key)
    frames = normalize_image(batch["frames"])
    out = model.apply({"params": params}, batch["audio"], frames, mask_a, mask_v)
    images = {}
    for name, x, pred, mask, patchify, unpatchify in (
        ("audio", batch["audio"], out["pred_a"], mask_a, losses.patchify_audio,
         lambda p: losses.unpatchify_audio(p, patch, model.mel_bins)),
        ("frames", frames, out["pred_v"], mask_v, losses.patchify_image,
         lambda p: losses.unpatchify_image(p, patch))):
      target = patchify(x.astype(jnp.float32), patch)
      pred = pred.astype(jnp.float32)
      if cfg_loss.norm_pix:
        mean = target.mean(-1, keepdims=True)
        std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
        pred = pred * std + mean
      removed = mask.mask[..., None]
      images[name] = x.astype(jnp.float32)
      images[f"{name}_masked"] = unpatchify(target * (1 - removed))
      # Visible patches shown as given, masked ones as predicted.
      images[f"{name}_reconstruction"] = unpatchify(target * (1 - removed) + pred * removed)
      images[f"{name}_mask"] = unpatchify(jnp.broadcast_to(removed, target.shape))
    return images

  return Method(model, init, loss_fn, reconstruct, flops.cav_mae_train_step_flops(config), masks)
