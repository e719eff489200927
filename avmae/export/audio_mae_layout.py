"""Our Audio-MAE parameters <-> the official PyTorch state_dict (facebookresearch/AudioMAE
models_mae.py `MaskedAutoencoderViT`, audio_exp=True, in_chans=1) and timm.

NumPy in and out. Layouts:
  audio_mae  the official pretraining model: same keys, order and shapes (430 entries at
             base with the Swin decoder; tests/golden/audio_mae_state_dict.txt)
  timm       the encoder as a timm `VisionTransformer` with a cls token and mean pooling
Conversions beyond cav_mae_layout's (Dense, LayerNorm, ViT blocks):
  patch_embed kernel [p*p, D] (time, freq) -> Conv2d weight [D, 1, p, p] over [B, 1, T, F]
  Swin blocks: attn.tau, attn.qkv, attn.proj, attn.meta_mlp.fc1/fc2,
  then norm1, mlp, norm2 (post-norm; official's registration order)
  pos_embed / decoder_pos_embed: the fixed sin-cos constants (models/audio_mae.pos_embed),
  written on export and checked (not loaded) on import.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae import checkpoint, masking
from avmae.export.cav_mae_layout import (attention_params, attention_state_dict, block_params,
                                         block_state_dict, linear_params, linear_state_dict,
                                         norm_params, norm_state_dict, prefixed)
from avmae.models.audio_mae import LN_EPS, layer_stacks, pos_embed

Params = dict[str, Any]
FORMATS = ("audio_mae", "timm")


def _swin_state_dict(p: Params) -> dict[str, np.ndarray]:
  attn = p["attn"]
  sd = {"attn.tau": np.asarray(attn["tau"])}
  sd.update(prefixed("attn", attention_state_dict(attn)))
  for fc in ("fc1", "fc2"):
    sd.update(prefixed(f"attn.meta_mlp.{fc}", linear_state_dict(attn["meta_mlp"][fc])))
  sd.update(prefixed("norm1", norm_state_dict(p["norm1"])))
  for fc in ("fc1", "fc2"):
    sd.update(prefixed(f"mlp.{fc}", linear_state_dict(p["mlp"][fc])))
  sd.update(prefixed("norm2", norm_state_dict(p["norm2"])))
  return sd


def _swin_params(sd: dict[str, np.ndarray], prefix: str, heads: int) -> Params:
  attn = attention_params(sd, f"{prefix}.attn", heads)
  attn.update(tau=sd[f"{prefix}.attn.tau"],
              meta_mlp={fc: linear_params(sd, f"{prefix}.attn.meta_mlp.{fc}")
                        for fc in ("fc1", "fc2")})
  return {"attn": attn, "norm1": norm_params(sd, f"{prefix}.norm1"),
          "norm2": norm_params(sd, f"{prefix}.norm2"),
          "mlp": {fc: linear_params(sd, f"{prefix}.mlp.{fc}") for fc in ("fc1", "fc2")}}


def _decoder_depth(model: Any) -> int:
  return model.swin_depth if model.decoder_mode == 1 else model.decoder_depth


def to_official(params: Params, model: Any) -> dict[str, np.ndarray]:
  """The official `MaskedAutoencoderViT.state_dict()` (same keys, order, shapes) of our
  parameters, for `model` (an AudioMAE module or its config), in either layer layout."""
  params = checkpoint.convert_layers(params, layer_stacks(model), scan_layers=False)
  d, p = model.embed_dim, model.patch_size
  grid = (model.audio_frames // p, model.mel_bins // p)
  sd = {"cls_token": np.asarray(params["cls_token"]),
        "pos_embed": pos_embed(d, grid)[None],
        "mask_token": np.asarray(params["mask_token"]),
        "decoder_pos_embed": pos_embed(model.decoder_embed_dim, grid)[None],
        "patch_embed.proj.weight": np.asarray(params["patch_embed"]["kernel"]).T.reshape(
            d, 1, p, p),
        "patch_embed.proj.bias": np.asarray(params["patch_embed"]["bias"])}
  for i in range(model.depth):
    sd.update(prefixed(f"blocks.{i}", block_state_dict(params[f"blocks_{i}"])))
  sd.update(prefixed("norm", norm_state_dict(params["norm"])))
  sd.update(prefixed("decoder_embed", linear_state_dict(params["decoder_embed"])))
  decoder_block = _swin_state_dict if model.decoder_mode == 1 else block_state_dict
  for i in range(_decoder_depth(model)):
    sd.update(prefixed(f"decoder_blocks.{i}", decoder_block(params[f"decoder_blocks_{i}"])))
  sd.update(prefixed("decoder_norm", norm_state_dict(params["decoder_norm"])))
  sd.update(prefixed("decoder_pred", linear_state_dict(params["decoder_pred"])))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _zeros(model: Any) -> Params:
  """Zero parameters of `model` (an AudioMAE module), for the keys and shapes an import needs."""
  audio = jnp.zeros((1, model.audio_frames, model.mel_bins))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), audio,
                                            masking.keep_all(1, model.num_tokens)))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.meta.unbox(boxed)["params"])


def from_official(state_dict: dict[str, np.ndarray], model: Any) -> Params:
  """Our parameters (in the model's layer layout) from an official `MaskedAutoencoderViT`
  state_dict for `model` (an AudioMAE module). Keys and shapes must be exactly the model's;
  the position embeddings must be the fixed sin-cos constants. Raises ValueError naming what
  does not fit."""
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  expected = to_official(_zeros(model), model)
  missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
  if missing or extra:
    raise ValueError(f"state_dict does not match the official Audio-MAE layout of this model "
                     f"(decoder_mode={model.decoder_mode}): missing {missing[:5]}, unexpected "
                     f"{extra[:5]} (a different size or decoder?)")
  for key, want in expected.items():
    if sd[key].shape != want.shape:
      raise ValueError(f"state_dict {key} has shape {sd[key].shape}, this model needs "
                       f"{want.shape} (a different size?)")
  for key in ("pos_embed", "decoder_pos_embed"):
    if not np.allclose(sd[key], expected[key], atol=1e-5):
      raise ValueError(f"state_dict {key} is not the fixed sin-cos embedding (trained position "
                       "embeddings, pos_trainable=True, are not supported)")
  d = model.embed_dim
  params: Params = {
      "cls_token": sd["cls_token"], "mask_token": sd["mask_token"],
      "patch_embed": {"kernel": sd["patch_embed.proj.weight"].reshape(d, -1).T,
                      "bias": sd["patch_embed.proj.bias"]},
      "norm": norm_params(sd, "norm"), "decoder_embed": linear_params(sd, "decoder_embed"),
      "decoder_norm": norm_params(sd, "decoder_norm"),
      "decoder_pred": linear_params(sd, "decoder_pred")}
  for i in range(model.depth):
    params[f"blocks_{i}"] = block_params(sd, f"blocks.{i}", model.num_heads)
  for i in range(_decoder_depth(model)):
    prefix = f"decoder_blocks.{i}"
    params[f"decoder_blocks_{i}"] = (
        _swin_params(sd, prefix, model.swin_heads) if model.decoder_mode == 1
        else block_params(sd, prefix, model.decoder_num_heads))
  return checkpoint.convert_layers(params, layer_stacks(model), model.scan_layers)


def to_timm(params: Params, model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The encoder as a timm `VisionTransformer` state_dict and its constructor arguments
  (`cav_mae_layout.timm_kwargs` turns them into keyword arguments): a cls token, the same
  position embeddings, mean pooling of the normalised patch tokens (our `features`).
  Input [B, 1, T, F], the normalised log-mel."""
  sd_all = to_official(params, model)
  sd = {k: v for k, v in sd_all.items()
        if k in ("cls_token", "pos_embed") or k.startswith(("patch_embed.", "blocks.", "norm."))}
  args = {"img_size": [model.audio_frames, model.mel_bins], "patch_size": model.patch_size,
          "in_chans": 1, "num_classes": 0, "global_pool": "avg", "embed_dim": model.embed_dim,
          "depth": model.depth, "num_heads": model.num_heads, "mlp_ratio": model.mlp_ratio,
          "class_token": True, "fc_norm": False, "norm_eps": LN_EPS}
  return sd, args


def official_args(model: Any) -> dict[str, Any]:
  """`models_mae.MaskedAutoencoderViT(**official_args, norm_layer=partial(nn.LayerNorm,
  eps=1e-6))` builds the official model of this layout (the Swin decoder's depth and heads are
  fixed at 16 there: only swin_depth = swin_heads = 16 loads)."""
  return {"img_size": [model.audio_frames, model.mel_bins], "patch_size": model.patch_size,
          "in_chans": 1, "embed_dim": model.embed_dim, "depth": model.depth,
          "num_heads": model.num_heads, "decoder_embed_dim": model.decoder_embed_dim,
          "decoder_depth": model.decoder_depth, "decoder_num_heads": model.decoder_num_heads,
          "mlp_ratio": model.mlp_ratio, "norm_pix_loss": True, "audio_exp": True,
          "decoder_mode": model.decoder_mode}


def export_files(params: Params, model: Any, fmt: str
                 ) -> list[tuple[str, dict[str, np.ndarray], dict[str, Any]]]:
  """Audio-MAE's export formats (avmae/export/to_torch.py): (file suffix, state_dict,
  metadata). "audio_mae": the official pretraining layout; "timm": the encoder."""
  preprocessing = {"input": "[B, 1, T, F] normalised log-mel (time rows, mel columns)"}
  if fmt == "timm":
    sd, args = to_timm(params, model)
    return [("", sd, {"encoder": "audio", "timm_args": args, "preprocessing": preprocessing})]
  args = {k: getattr(model, k) for k in (
      "audio_frames", "mel_bins", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
      "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mode", "swin_depth",
      "swin_heads")}
  return [("", to_official(params, model), {
      "layout": "official Audio-MAE MaskedAutoencoderViT state_dict (facebookresearch/"
                "AudioMAE models_mae.py); official checkpoints wrap it as {'model': "
                "state_dict} (export --wrap=model)",
      "official_args": official_args(model), "torch_audio_mae_args": args,
      "preprocessing": preprocessing})]
