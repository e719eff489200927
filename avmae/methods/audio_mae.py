"""Audio-MAE (Huang et al., NeurIPS 2022): masked reconstruction of the log-mel alone, as the
official facebookresearch/AudioMAE: per-patch normalised targets (unbiased variance, eps 1e-6),
the mean squared error per patch averaged over the masked patches.

Masks: official's unstructured `random_masking` (int(L * (1 - ratio)) tokens stay, shuffled)
or its 2-D `random_masking_2d` (masking.time_freq_mask). The Swin decoder's relative position
bias MLP has dropout 0.1 in training (official's `Mlp(drop=0.1)`): its key is drawn from the
first example's key, so it depends on the step and the batch, never on the mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from avmae import flops, losses, masking, plots
from avmae.export import audio_mae_layout as layout
from avmae.methods.method import Batch, Check, Method
from avmae.models.audio_mae import AudioMAE

MASK_MODES = ("unstructured", "time_freq")


def config_checks(config: ml_collections.ConfigDict, info: dict[str, Any],
                  mesh: jax.sharding.Mesh) -> list[Check]:
  """The model's geometry against the data, its widths against the mesh axes."""
  m, d = config.model, config.data
  heads = (m.swin_heads if m.decoder_mode == 1 else m.decoder_num_heads)
  return [
      (m.audio_frames == d.audio_frames, "model.audio_frames",
       f"{m.audio_frames} differs from data.audio_frames={d.audio_frames}"),
      (m.mel_bins == info["features"]["mel_bins"], "model.mel_bins",
       f"{m.mel_bins}, but the dataset {d.dir} has {info['features']['mel_bins']} mel bins"),
      (m.audio_frames % m.patch_size == 0 and m.mel_bins % m.patch_size == 0,
       "model.patch_size", f"{m.patch_size} does not divide the audio input "
       f"{m.audio_frames}x{m.mel_bins}"),
      (m.decoder_mode in (0, 1), "model.decoder_mode",
       f"{m.decoder_mode}; 1 (shifted windows, official) or 0 (global attention)"),
      # timm shrinks a window to the grid: a 4 x 4 window must tile what is larger.
      (m.decoder_mode == 0 or all(g % min(g, 4) == 0 for g in (
          m.audio_frames // m.patch_size, m.mel_bins // m.patch_size)),
       "model.patch_size", f"{m.patch_size}: the Swin decoder's 4 x 4 windows must tile the "
       f"{m.audio_frames // m.patch_size} x {m.mel_bins // m.patch_size} patch grid"),
      (m.embed_dim % m.num_heads == 0, "model.num_heads",
       f"{m.num_heads} does not divide model.embed_dim={m.embed_dim}"),
      (m.decoder_embed_dim % heads == 0,
       "model.swin_heads" if m.decoder_mode == 1 else "model.decoder_num_heads",
       f"{heads} does not divide model.decoder_embed_dim={m.decoder_embed_dim}"),
      (m.embed_dim % 4 == 0 and m.decoder_embed_dim % 4 == 0, "model.embed_dim",
       f"{m.embed_dim} (and decoder_embed_dim={m.decoder_embed_dim}) must be multiples of 4 "
       "for 2-D sin-cos position embeddings"),
      (config.masking.mode in MASK_MODES, "masking.mode",
       f"{config.masking.mode!r}; one of {MASK_MODES}"),
      (d.num_frames == 0, "data.num_frames",
       f"{d.num_frames}: Audio-MAE reads no frames (0)"),
      (m.num_heads % mesh.shape["tensor"] == 0 and heads % mesh.shape["tensor"] == 0,
       "mesh.tensor", f"{mesh.shape['tensor']} does not divide the attention heads"),
      (m.embed_dim % mesh.shape["fsdp"] == 0 and m.decoder_embed_dim % mesh.shape["fsdp"] == 0,
       "mesh.fsdp", f"{mesh.shape['fsdp']} does not divide the embedding widths"),
  ]


def build(config: ml_collections.ConfigDict) -> Method:
  model = AudioMAE(**config.model, dtype=jnp.dtype(config.dtype))
  cfg_mask = config.masking
  norm_pix = config.loss.norm_pix

  def masks(keys: jax.Array) -> tuple[masking.Mask]:
    """The log-mel mask of the examples with these keys [B]."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    if cfg_mask.mode == "time_freq":
      return (masking.time_freq_mask(keys, model.grid, cfg_mask.mask_t_prob,
                                     cfg_mask.mask_f_prob),)
    return (masking.random_mask(keys, model.num_tokens, cfg_mask.ratio),)

  def batch_masks(batch: Batch, key: jax.Array) -> masking.Mask:
    return masks(masking.example_keys(key, batch["audio"].shape[0]))[0]

  def init(key: jax.Array, batch: Batch) -> Any:
    return model.init(key, batch["audio"], batch_masks(batch, key))

  def example_batch(batch_size: int) -> Batch:
    return {"audio": jnp.zeros((batch_size, model.audio_frames, model.mel_bins)),
            "valid": jnp.ones((batch_size,), bool)}

  def features(params: Any, batch: Batch) -> dict[str, jax.Array]:
    return model.apply({"params": params}, batch["audio"], method="features")

  def loss_fn(params: Any, batch: Batch, keys: jax.Array):
    """(params, batch, one key per example) -> (loss, metrics); in float32."""
    (mask,) = masks(keys)
    dropout = jax.random.fold_in(keys[0], 1)
    out = model.apply({"params": params}, batch["audio"], mask, False,
                      rngs={"dropout": dropout})
    loss = losses.reconstruction_loss(out["pred"], model.patchify(batch["audio"]), mask.mask,
                                      norm_pix, batch["valid"])
    return loss, {"loss": loss}

  def reconstruct(params: Any, batch: Batch, key: jax.Array) -> dict[str, jax.Array]:
    """The log-mel, masked and reconstructed (predicted where masked; with norm_pix mapped
    back with each patch's own mean and unbiased std), for the pictures."""
    mask = batch_masks(batch, key)
    pred = model.apply({"params": params}, batch["audio"], mask)["pred"].astype(jnp.float32)
    target = model.patchify(batch["audio"].astype(jnp.float32))
    if norm_pix:
      pred = (pred * jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
              + target.mean(-1, keepdims=True))
    removed = mask.mask[..., None]
    return {"audio": batch["audio"].astype(jnp.float32),
            "audio_masked": model.unpatchify(target * (1 - removed)),
            "audio_reconstruction": model.unpatchify(target * (1 - removed) + pred * removed),
            "audio_mask": model.unpatchify(jnp.broadcast_to(removed, target.shape))}

  return Method(model=model, init=init, loss_fn=loss_fn, reconstruct=reconstruct,
                plot_reconstructions=lambda images, path, title: plots.plot_reconstructions(
                    plots.audio_panels(images), path, title),
                train_step_flops=3.0 * config.data.batch_size * flops.audio_mae_forward_flops(
                    config.model, config.masking),
                masks=masks, example_batch=example_batch,
                config_checks=lambda info, mesh: config_checks(config, info, mesh),
                features=features, retrieval={},
                export_formats=("audio_mae", "timm"),
                export=lambda params, fmt, options: layout.export_files(
                    params, model, fmt),
                import_state_dict=lambda sd: layout.from_official(sd, model))
