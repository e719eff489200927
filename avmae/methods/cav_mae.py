"""CAV-MAE's objective: masked reconstruction of both modalities plus audio-visual InfoNCE."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avmae import flops, losses, masking, plots
from avmae.data.augment import normalize_image
from avmae.export import cav_mae_layout
from avmae.methods.method import Batch, Check, Method
from avmae.models.cav_mae import CAVMAE


def config_checks(config: ml_collections.ConfigDict, info: dict[str, Any],
                  mesh: jax.sharding.Mesh) -> list[Check]:
  """The model's geometry against the data, its widths against the mesh axes."""
  m, d = config.model, config.data
  checks = [
      (m.audio_frames == d.audio_frames, "model.audio_frames",
       f"{m.audio_frames} differs from data.audio_frames={d.audio_frames}"),
      (m.image_size == d.image_size, "model.image_size",
       f"{m.image_size} differs from data.image_size={d.image_size}"),
      (m.mel_bins == info["features"]["mel_bins"], "model.mel_bins",
       f"{m.mel_bins}, but the dataset {d.dir} has {info['features']['mel_bins']} mel bins"),
      (m.audio_frames % m.patch_size == 0 and m.mel_bins % m.patch_size == 0,
       "model.patch_size", f"{m.patch_size} does not divide the audio input "
       f"{m.audio_frames}x{m.mel_bins}"),
      (m.image_size % m.patch_size == 0, "model.patch_size",
       f"{m.patch_size} does not divide model.image_size={m.image_size}"),
      (m.embed_dim % m.num_heads == 0, "model.num_heads",
       f"{m.num_heads} does not divide model.embed_dim={m.embed_dim}"),
      (m.decoder_embed_dim % m.decoder_num_heads == 0, "model.decoder_num_heads",
       f"{m.decoder_num_heads} does not divide model.decoder_embed_dim={m.decoder_embed_dim}"),
      (m.num_frames == d.num_frames, "model.num_frames",
       f"{m.num_frames} differs from data.num_frames={d.num_frames}"),
      (m.num_frames % m.tubelet_size == 0, "model.tubelet_size",
       f"{m.tubelet_size} does not divide model.num_frames={m.num_frames}"),
      (m.num_frames == 1 or m.embed_dim % 16 == 0 and m.decoder_embed_dim % 16 == 0,
       "model.embed_dim", f"{m.embed_dim} (and decoder_embed_dim={m.decoder_embed_dim}) must "
       "be multiples of 16 for 3-D sin-cos position embeddings of clips"),
      (config.masking.mode_v in ("unstructured", "tube"), "masking.mode_v",
       f"{config.masking.mode_v!r}; one of 'unstructured', 'tube'"),
      (config.loss.video_target in ("patch", "tubelet"), "loss.video_target",
       f"{config.loss.video_target!r}; one of 'patch', 'tubelet'"),
      (m.num_heads % mesh.shape["tensor"] == 0 and m.decoder_num_heads % mesh.shape["tensor"] == 0,
       "mesh.tensor", f"{mesh.shape['tensor']} does not divide the attention heads"),
      (m.embed_dim % mesh.shape["fsdp"] == 0 and m.decoder_embed_dim % mesh.shape["fsdp"] == 0,
       "mesh.fsdp", f"{mesh.shape['fsdp']} does not divide the embedding widths"),
  ]
  if config.loss.group_size:
    micro = d.batch_size // config.optimizer.accumulation_steps
    checks.append((micro % config.loss.group_size == 0, "loss.group_size",
                   f"{config.loss.group_size} does not divide the microbatch "
                   f"data.batch_size / optimizer.accumulation_steps = {micro}"))
  return checks


def build(config: ml_collections.ConfigDict) -> Method:
  model = CAVMAE(**config.model, dtype=jnp.dtype(config.dtype))
  cfg_mask, cfg_loss = config.masking, config.loss
  patch = model.patch_size
  slots = model.video_grid[0]  # time slots of video tokens (a tube mask repeats over them)

  def masks(keys: jax.Array) -> tuple[masking.Mask, masking.Mask]:
    """Audio and video masks of the examples with these keys [B]."""
    fold = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    return (masking.make_mask(fold(0), model.num_audio_tokens, cfg_mask.ratio_a,
                              cfg_mask.mode_a, grid=model.audio_grid),
            masking.make_mask(fold(1), model.num_video_tokens, cfg_mask.ratio_v, cfg_mask.mode_v,
                              grid=(slots, model.num_video_tokens // slots)))

  def batch_masks(batch: Batch, key: jax.Array) -> tuple[masking.Mask, masking.Mask]:
    return masks(masking.example_keys(key, batch["audio"].shape[0]))

  def init(key: jax.Array, batch: Batch) -> Any:
    return model.init(key, batch["audio"], normalize_image(batch["frames"]),
                      *batch_masks(batch, key))

  def initial() -> Any:
    """A fresh initialisation (config.seed) as NumPy: what a MAE ViT import does not cover."""
    boxed = jax.jit(lambda: init(jax.random.key(config.seed), example_batch(1)))()
    return jax.tree.map(np.asarray, nn.meta.unbox(boxed)["params"])

  def example_batch(batch_size: int) -> Batch:
    """Zeros of the step's input shapes (what init traces with; no data needed)."""
    return {"audio": jnp.zeros((batch_size, model.audio_frames, model.mel_bins)),
            "frames": jnp.zeros((batch_size, *model.frames_shape), jnp.uint8),
            "valid": jnp.ones((batch_size,), bool)}

  def features(params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Probe features (`CAVMAE.features`). A one-frame model given every frame of a clip
    ([B, N, H, W, 3], data.all_frames) gives the mean of its features of each frame with the
    clip's audio; a multi-frame model sees the clip whole."""
    frames, audio = normalize_image(batch["frames"]), batch["audio"]
    if model.num_frames > 1 or frames.ndim == 4:
      return model.apply({"params": params}, audio, frames, method="features")
    b, n = frames.shape[:2]
    out = model.apply({"params": params}, jnp.repeat(audio, n, axis=0),
                      frames.reshape((b * n,) + frames.shape[2:]), method="features")
    return {k: v.reshape((b, n) + v.shape[1:]).mean(1) for k, v in out.items()}

  def video_target(frames: jax.Array) -> tuple[jax.Array, bool]:
    """(target patches, whether reconstruction_loss normalises them per patch)."""
    patches = model.patchify_video(frames)
    if cfg_loss.video_target == "tubelet":
      return losses.tubelet_target(patches), False
    return patches, cfg_loss.norm_pix

  def loss_fn(params: Any, batch: Batch, keys: jax.Array):
    """(params, batch, one key per example) -> (loss, metrics); every term in float32."""
    mask_a, mask_v = masks(keys)
    frames = normalize_image(batch["frames"])  # uint8 from the pipeline
    out = model.apply({"params": params}, batch["audio"], frames, mask_a, mask_v)
    valid = batch["valid"]
    rec_a = losses.reconstruction_loss(out["pred_a"], losses.patchify_audio(batch["audio"], patch),
                                       mask_a.mask, cfg_loss.norm_pix, valid)
    target_v, norm_pix_v = video_target(frames)
    rec_v = losses.reconstruction_loss(out["pred_v"], target_v, mask_v.mask, norm_pix_v, valid)
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
    for name, x, pred, mask, patchify, unpatchify, target_kind in (
        ("audio", batch["audio"], out["pred_a"], mask_a, lambda x: losses.patchify_audio(x, patch),
         lambda p: losses.unpatchify_audio(p, patch, model.mel_bins), "patch"),
        ("frames", frames, out["pred_v"], mask_v, model.patchify_video, model.unpatchify_video,
         cfg_loss.video_target)):
      target = patchify(x.astype(jnp.float32))
      pred = pred.astype(jnp.float32)
      if target_kind == "tubelet":
        pred = losses.from_tubelet_target(pred, target)
      elif cfg_loss.norm_pix:
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

  return Method(model=model, init=init, loss_fn=loss_fn, reconstruct=reconstruct,
                plot_reconstructions=lambda images, path, title: plots.plot_reconstructions(
                    plots.audio_video_panels(images), path, title),
                train_step_flops=flops.cav_mae_train_step_flops(config), masks=masks,
                example_batch=example_batch,
                config_checks=lambda info, mesh: config_checks(config, info, mesh),
                features=features,
                retrieval={"a2v": ("audio", "video"), "v2a": ("video", "audio")},
                export_formats=cav_mae_layout.export_formats(model),
                export=lambda params, fmt, options: cav_mae_layout.export_files(
                    params, model, config.model, fmt, options),
                import_state_dict=lambda sd: cav_mae_layout.from_official(sd, model, initial))
