"""Audiovisual MAE (Georgescu et al., ICCV 2023): masked reconstruction of the spectrogram and
the video clip, no contrastive term, as the official scenic code (docs/av_mae_reference.md).

Official in the details: random masks of int(ratio * L) tokens per modality; pixels in
[-1, 1] and the raw (dataset-normalised) log-mel as targets, not normalised per patch
(loss.standardise_per_patch, off in the released configs, standardises each); per
modality the squared error over masked tokens, per element (the mean over patch values),
weighted 0.5 / 0.5. The official `sum / (count + 1e-8)` differs from our masked mean by
1e-8 / count relative, below float32 resolution.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avmae import checkpoint, flops, losses, masking, plots
from avmae.export import cav_mae_layout as layout  # timm-style block and linear layouts
from avmae.methods.method import Batch, Check, Method, raise_failed
from avmae.models.av_mae import AVMAE, DECODERS, ENCODERS, MODALITIES, num_visible

# The names of the batch's inputs per modality, and in the pictures.
_NAMES = {"a": "audio", "v": "frames"}


def scale_pixels(frames: jax.Array) -> jax.Array:
  """uint8 RGB -> float32 in [-1, 1], the official input scaling."""
  return frames.astype(jnp.float32) / 127.5 - 1.0


def strategy_checks(m: ml_collections.ConfigDict) -> list[Check]:
  """Known strategies (checked first: the model cannot be built without them)."""
  return [(m.encoder_strategy in ENCODERS, "model.encoder_strategy",
           f"{m.encoder_strategy!r}; one of {sorted(ENCODERS)}"),
          (m.decoder_strategy in DECODERS, "model.decoder_strategy",
           f"{m.decoder_strategy!r}; one of {sorted(DECODERS)}")]


def config_checks(config: ml_collections.ConfigDict, info: dict[str, Any],
                  mesh: jax.sharding.Mesh) -> list[Check]:
  """The model's geometry against the data, its strategies, widths against the mesh axes."""
  m, d = config.model, config.data
  mid_fusion = m.encoder_strategy == "separate_encoders_and_concat"
  checks = strategy_checks(m) + [
      (m.audio_frames == d.audio_frames, "model.audio_frames",
       f"{m.audio_frames} differs from data.audio_frames={d.audio_frames}"),
      (m.image_size == d.image_size, "model.image_size",
       f"{m.image_size} differs from data.image_size={d.image_size}"),
      (m.num_frames == d.num_frames, "model.num_frames",
       f"{m.num_frames} differs from data.num_frames={d.num_frames}"),
      (m.mel_bins == info["features"]["mel_bins"], "model.mel_bins",
       f"{m.mel_bins}, but the dataset {d.dir} has {info['features']['mel_bins']} mel bins"),
      (m.image_size % m.patch_size == 0, "model.patch_size",
       f"{m.patch_size} does not divide model.image_size={m.image_size}"),
      (m.num_frames % m.tubelet_size == 0, "model.tubelet_size",
       f"{m.tubelet_size} does not divide model.num_frames={m.num_frames}"),
      # Two MAEs that never meet, refused by the official config too.
      (not (m.encoder_strategy == "separate_encoders"
            and m.decoder_strategy == "separate_decoders"), "model.decoder_strategy",
       "'separate_decoders' with model.encoder_strategy='separate_encoders' trains two "
       "unrelated models"),
      (not mid_fusion or 0 < m.fusion_layers < m.depth, "model.fusion_layers",
       f"{m.fusion_layers}; mid fusion needs 0 < fusion_layers < model.depth={m.depth}"),
      (m.embed_dim % m.num_heads == 0, "model.num_heads",
       f"{m.num_heads} does not divide model.embed_dim={m.embed_dim}"),
      (m.decoder_embed_dim % m.decoder_num_heads == 0, "model.decoder_num_heads",
       f"{m.decoder_num_heads} does not divide model.decoder_embed_dim={m.decoder_embed_dim}"),
      (m.embed_dim % 2 == 0 and m.decoder_embed_dim % 2 == 0, "model.embed_dim",
       f"{m.embed_dim} (and decoder_embed_dim={m.decoder_embed_dim}) must be even for sin-cos "
       "position embeddings"),
      (config.masking.mode_v in ("unstructured", "tube"), "masking.mode_v",
       f"{config.masking.mode_v!r}; one of 'unstructured', 'tube'"),
      (m.num_heads % mesh.shape["tensor"] == 0 and m.decoder_num_heads % mesh.shape["tensor"] == 0,
       "mesh.tensor", f"{mesh.shape['tensor']} does not divide the attention heads"),
      (m.embed_dim % mesh.shape["fsdp"] == 0 and m.decoder_embed_dim % mesh.shape["fsdp"] == 0,
       "mesh.fsdp", f"{mesh.shape['fsdp']} does not divide the embedding widths"),
  ]
  if m.use_inpainting:  # the other modality's visible tokens must fit in this one's sequence
    model = AVMAE(**m)
    ratios = {"a": config.masking.ratio_a, "v": config.masking.ratio_v}
    for mod, other in zip(MODALITIES, MODALITIES[::-1]):
      seen = num_visible(model.num_tokens[other], ratios[other],
                         config.masking.mode_v if other == "v" else "unstructured",
                         model.video_grid[0])
      checks.append((seen < model.num_tokens[mod], "model.use_inpainting",
                     f"True needs fewer visible {_NAMES[other]} tokens ({seen}) than "
                     f"{_NAMES[mod]} tokens ({model.num_tokens[mod]}): raise the mask ratio"))
  return checks


def _state_dict(params: dict[str, Any], model: AVMAE) -> dict[str, np.ndarray]:
  """avmae's PyTorch AVMAE (avmae/export/torch_av_mae.py) state_dict of our parameters."""
  params = checkpoint.convert_layers(params, model.layer_stacks, scan_layers=False)
  p, t, dim = model.patch_size, model.tubelet_size, model.embed_dim
  sd = {}
  for m, shape in (("a", (p, p, 1)), ("v", (t, p, p, 3))):
    kernel = np.asarray(params[f"patch_embed_{m}"]["kernel"])  # [values, D], values (time, ...)
    order = (len(shape), len(shape) - 1, *range(len(shape) - 1))  # -> [D, channels, ...]
    sd[f"patch_embed_{m}.proj.weight"] = kernel.reshape(*shape, dim).transpose(order)
    sd[f"patch_embed_{m}.proj.bias"] = np.asarray(params[f"patch_embed_{m}"]["bias"])
  for stack, depth in model.layer_stacks.items():
    for i in range(depth):
      sd.update(layout.prefixed(f"{stack}.{i}", layout.block_state_dict(params[f"{stack}_{i}"])))
    sd.update(layout.prefixed(f"{stack}_norm", layout.norm_state_dict(params[f"{stack}_norm"])))
  for m in MODALITIES:
    for name in (f"decoder_embed_{m}", f"decoder_pred_{m}"):
      sd.update(layout.prefixed(name, layout.linear_state_dict(params[name])))
    sd[f"mask_token_{m}"] = np.asarray(params[f"mask_token_{m}"])
  return sd


def build(config: ml_collections.ConfigDict) -> Method:
  raise_failed(strategy_checks(config.model))
  model = AVMAE(**config.model, dtype=jnp.dtype(config.dtype))
  ratios = {"a": config.masking.ratio_a, "v": config.masking.ratio_v}
  weights = {"a": config.loss.weight_a, "v": config.loss.weight_v}
  standardise = config.loss.standardise_per_patch

  slots = model.video_grid[0]

  def masks(keys: jax.Array) -> tuple[masking.Mask, masking.Mask]:
    """Spectrogram and video masks of the examples with these keys [B]: official's random
    masks, int(ratio * L) tokens removed; or for the video with masking.mode_v="tube",
    VideoMAE's tube masks."""
    fold = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    n_a, n_v = model.num_tokens["a"], model.num_tokens["v"]
    mask_a = masking.random_mask(fold(0), n_a, ratios["a"], num_visible(n_a, ratios["a"]))
    if config.masking.mode_v == "tube":
      return mask_a, masking.tube_mask(fold(1), (slots, n_v // slots), ratios["v"])
    return mask_a, masking.random_mask(fold(1), n_v, ratios["v"], num_visible(n_v, ratios["v"]))

  def batch_masks(batch: Batch, key: jax.Array) -> tuple[masking.Mask, masking.Mask]:
    return masks(masking.example_keys(key, batch["audio"].shape[0]))

  def init(key: jax.Array, batch: Batch) -> Any:
    return model.init(key, batch["audio"], scale_pixels(batch["frames"]),
                      *batch_masks(batch, key))

  def example_batch(batch_size: int) -> Batch:
    return {"audio": jnp.zeros((batch_size, model.audio_frames, model.mel_bins)),
            "frames": jnp.zeros((batch_size, *model.frames_shape), jnp.uint8),
            "valid": jnp.ones((batch_size,), bool)}

  def features(params: Any, batch: Batch) -> dict[str, jax.Array]:
    """`AVMAE.features`: each modality encoded alone, and both together."""
    return model.apply({"params": params}, batch["audio"], scale_pixels(batch["frames"]),
                       method="features")

  def forward(params, batch, mask_a, mask_v):
    """(model outputs, patches of the input per modality, predictions in the patches' units:
    with loss.standardise_per_patch the model predicts each patch standardised, mapped back
    with the patch's own mean and (biased) std, as MAE pictures do)."""
    frames = scale_pixels(batch["frames"])
    out = model.apply({"params": params}, batch["audio"], frames, mask_a, mask_v)
    patches = model.patchify(batch["audio"], frames)
    preds = {m: out[f"pred_{m}"].astype(jnp.float32) for m in MODALITIES}
    if standardise:
      preds = {m: preds[m] * jnp.sqrt(patches[m].var(-1, keepdims=True) + 1e-6)
               + patches[m].mean(-1, keepdims=True) for m in MODALITIES}
    return out, patches, preds

  def targets_of(patches: dict[str, jax.Array]) -> dict[str, jax.Array]:
    if not standardise:
      return patches
    return {m: jax.nn.standardize(x, axis=-1, epsilon=1e-6) for m, x in patches.items()}

  def loss_fn(params: Any, batch: Batch, keys: jax.Array):
    """(params, batch, one key per example) -> (loss, metrics); every term in float32."""
    mask_a, mask_v = masks(keys)
    out, patches, _ = forward(params, batch, mask_a, mask_v)
    targets = targets_of(patches)
    counted = model.prediction_masks({"a": mask_a, "v": mask_v})
    rec = {m: losses.reconstruction_loss(out[f"pred_{m}"], targets[m], counted[m],
                                         norm_pix=False, valid=batch["valid"])
           for m in MODALITIES}
    loss = sum(weights[m] * rec[m] for m in MODALITIES)
    return loss, {"loss": loss, "loss_mae_a": rec["a"], "loss_mae_v": rec["v"]}

  def reconstruct(params: Any, batch: Batch, key: jax.Array) -> dict[str, jax.Array]:
    """Inputs, masked inputs and reconstructions (predictions where the loss counts them,
    the input elsewhere) for `plots.audio_video_panels`."""
    mask_a, mask_v = batch_masks(batch, key)
    masks_ = {"a": mask_a, "v": mask_v}
    _, patches, preds = forward(params, batch, mask_a, mask_v)
    counted = model.prediction_masks(masks_)
    pieces = {"": patches,
              "_masked": {m: patches[m] * (1 - masks_[m].mask[..., None]) for m in MODALITIES},
              "_reconstruction": {m: jnp.where(counted[m][..., None] > 0, preds[m], patches[m])
                                  for m in MODALITIES},
              "_mask": {m: jnp.broadcast_to(masks_[m].mask[..., None], patches[m].shape)
                        for m in MODALITIES}}
    images = {}
    for suffix, patches in pieces.items():
      unpatched = model.unpatchify(patches)
      images.update({f"{_NAMES[m]}{suffix}": unpatched[m] for m in MODALITIES})
    return images

  def export(params: Any, fmt: str, options: dict[str, Any]):
    del fmt, options  # one format, the pretraining model
    args = {k: v for k, v in config.model.to_dict().items() if k not in ("remat", "scan_layers")}
    return [("", _state_dict(params, model), {
        "layout": "avmae's AV-MAE layout (no PyTorch release exists): load it with "
                  "avmae/export/torch_av_mae.py AVMAE(**torch_av_mae_args); spectrogram "
                  "tokens time-major from a Conv2d over [B, 1, T, F], video tubelets from a "
                  "Conv3d over [B, 3, T, H, W], 1-D sin-cos positions (not stored)",
        "torch_av_mae_args": args,
        "preprocessing": {"pixels": "x / 127.5 - 1 (image_mean and image_std do not apply)"}})]

  return Method(model=model, init=init, loss_fn=loss_fn, reconstruct=reconstruct,
                plot_reconstructions=lambda images, path, title: plots.plot_reconstructions(
                    plots.audio_video_panels(images, "image_pm1"), path, title),
                train_step_flops=3.0 * config.data.batch_size * flops.av_mae_forward_flops(
                    config.model, config.masking),
                masks=masks, example_batch=example_batch,
                config_checks=lambda info, mesh: config_checks(config, info, mesh),
                features=features,
                retrieval={"a2v": ("audio", "video"), "v2a": ("video", "audio")},
                export_formats=("av_mae",), export=export,
                import_state_dict=None)  # no official PyTorch model exists
