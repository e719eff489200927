"""Our CAV-MAE parameters <-> the official PyTorch state_dict (YuanGongND/cav-mae `CAVMAE`).

NumPy only: the torch side (saving .pth, loading official checkpoints) builds on these two
functions. Conversions, all exact:
  Dense kernel [in, out]                 -> Linear weight [out, in]
  patch_embed_a kernel [p*p, D] (f, t)   -> Conv2d weight [D, 1, p, p] (input [B, 1, F, T])
  patch_embed_v kernel [p*p*3, D] (r,c,ch) -> Conv2d weight [D, 3, p, p]
  qkv kernel [D, 3, H, Dh]               -> qkv weight [3*H*Dh, D], rows ordered [3][H][Dh]
  out kernel [H, Dh, D]                  -> proj weight [D, H*Dh]
  LayerNorm scale/bias                   -> weight/bias
Frozen sin-cos position embeddings are constants here and buffers-like parameters there: they
are written on export and checked (not loaded) on import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from avmae.models.vit import sincos_2d

Params = dict[str, Any]
_BLOCK_NORMS = ("norm1", "norm1_a", "norm1_v")
_BLOCK_NORMS2 = ("norm2", "norm2_a", "norm2_v")


def _linear(p: Params) -> dict[str, np.ndarray]:
  return {"weight": np.asarray(p["kernel"]).T, "bias": np.asarray(p["bias"])}


def _norm(p: Params) -> dict[str, np.ndarray]:
  return {"weight": np.asarray(p["scale"]), "bias": np.asarray(p["bias"])}


def _block(p: Params) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for name in _BLOCK_NORMS:
    out.update({f"{name}.{k}": v for k, v in _norm(p[name]).items()})
  qkv = np.asarray(p["attn"]["qkv_kernel"])  # [D, 3, H, Dh]
  dim = qkv.shape[0]
  out["attn.qkv.weight"] = qkv.reshape(dim, -1).T
  out["attn.qkv.bias"] = np.asarray(p["attn"]["qkv_bias"]).reshape(-1)
  out["attn.proj.weight"] = np.asarray(p["attn"]["out_kernel"]).reshape(-1, dim).T
  out["attn.proj.bias"] = np.asarray(p["attn"]["out_bias"])
  for name in _BLOCK_NORMS2:
    out.update({f"{name}.{k}": v for k, v in _norm(p[name]).items()})
  for fc in ("fc1", "fc2"):
    out.update({f"mlp.{fc}.{k}": v for k, v in _linear(p["mlp"][fc]).items()})
  return out


def _count(params: Params, prefix: str) -> int:
  return sum(1 for k in params if k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit())


def to_official(params: Params, model: Any) -> dict[str, np.ndarray]:
  """The official `CAVMAE.state_dict()` (same keys, order, shapes) of our parameters.

  `model` is the CAVMAE module (or its config) for the geometry: patch_size, audio grid,
  image_size, embed widths.
  """
  p = model.patch_size
  f_grid, t_grid = model.mel_bins // p, model.audio_frames // p
  side = model.image_size // p
  d, dd = model.embed_dim, model.decoder_embed_dim
  sd: dict[str, np.ndarray] = {}
  for name in ("modality_a", "modality_v"):
    sd[name] = np.asarray(params[name])
  sd["pos_embed_a"] = sincos_2d(d, f_grid, t_grid)[None]
  sd["pos_embed_v"] = sincos_2d(d, side, side)[None]
  for name in ("mask_token", "decoder_modality_a", "decoder_modality_v"):
    sd[name] = np.asarray(params[name])
  sd["decoder_pos_embed_a"] = sincos_2d(dd, f_grid, t_grid)[None]
  sd["decoder_pos_embed_v"] = sincos_2d(dd, side, side)[None]
  ka = np.asarray(params["patch_embed_a"]["kernel"])  # [(f, t), D]
  sd["patch_embed_a.proj.weight"] = ka.T.reshape(d, 1, p, p)
  sd["patch_embed_a.proj.bias"] = np.asarray(params["patch_embed_a"]["bias"])
  kv = np.asarray(params["patch_embed_v"]["kernel"]).reshape(p, p, 3, d)  # (row, col, ch)
  sd["patch_embed_v.proj.weight"] = kv.transpose(3, 2, 0, 1)
  sd["patch_embed_v.proj.bias"] = np.asarray(params["patch_embed_v"]["bias"])
  for stack in ("blocks_a", "blocks_v", "blocks_u"):
    for i in range(_count(params, stack)):
      sd.update({f"{stack}.{i}.{k}": v for k, v in _block(params[f"{stack}_{i}"]).items()})
  for name in ("norm_a", "norm_v", "norm"):
    sd.update({f"{name}.{k}": v for k, v in _norm(params[name]).items()})
  sd.update({f"decoder_embed.{k}": v for k, v in _linear(params["decoder_embed"]).items()})
  for i in range(_count(params, "decoder_blocks")):
    sd.update({f"decoder_blocks.{i}.{k}": v
               for k, v in _block(params[f"decoder_blocks_{i}"]).items()})
  sd.update({f"decoder_norm.{k}": v for k, v in _norm(params["decoder_norm"]).items()})
  for name in ("decoder_pred_a", "decoder_pred_v"):
    sd.update({f"{name}.{k}": v for k, v in _linear(params[name]).items()})
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def from_official(state_dict: dict[str, np.ndarray], model: Any) -> Params:
  """Our parameters from an official state_dict (a "module." prefix is stripped). The frozen
  position embeddings must equal our sin-cos constants, else ValueError (trained ones cannot
  be represented by this model)."""
  sd = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state_dict.items()}
  try:
    params = _template(sd, model)
  except KeyError as e:
    raise ValueError(f"state_dict does not match the official CAVMAE layout: missing "
                     f"[{e.args[0]!r}]") from None
  expected = to_official(params, model)
  missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
  if missing or extra:
    raise ValueError(f"state_dict does not match the official CAVMAE layout: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}")
  for key, want in expected.items():
    if sd[key].shape != want.shape:
      raise ValueError(f"state_dict {key} has shape {sd[key].shape}, expected {want.shape}")
  for key in ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v"):
    if not np.allclose(sd[key], expected[key], atol=1e-5):
      raise ValueError(f"state_dict {key} is not the fixed sin-cos embedding (trained position "
                       "embeddings are not supported by this model)")
  return params


def _template(sd: dict[str, np.ndarray], model: Any) -> Params:
  """Inverse of the conversions in `to_official` (head counts from `model`)."""
  def linear(prefix):
    return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}

  def norm(prefix):
    return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}

  def block(prefix):
    w = sd[f"{prefix}.attn.qkv.weight"]  # [3*H*Dh, D]
    dim = w.shape[1]
    heads_x_dh = w.shape[0] // 3
    bias = sd[f"{prefix}.attn.qkv.bias"]
    heads = sd_heads[prefix.split(".")[0]]
    out = {n: norm(f"{prefix}.{n}") for n in _BLOCK_NORMS + _BLOCK_NORMS2}
    out["attn"] = {
        "qkv_kernel": w.T.reshape(dim, 3, heads, heads_x_dh // heads),
        "qkv_bias": bias.reshape(3, heads, heads_x_dh // heads),
        "out_kernel": sd[f"{prefix}.attn.proj.weight"].T.reshape(heads, heads_x_dh // heads, dim),
        "out_bias": sd[f"{prefix}.attn.proj.bias"]}
    out["mlp"] = {"fc1": linear(f"{prefix}.mlp.fc1"), "fc2": linear(f"{prefix}.mlp.fc2")}
    return out

  d = sd["patch_embed_a.proj.weight"].shape[0]
  p = sd["patch_embed_a.proj.weight"].shape[-1]
  # Head counts are not in a state_dict: they come from the model's config.
  sd_heads = {"blocks_a": model.num_heads, "blocks_v": model.num_heads,
              "blocks_u": model.num_heads, "decoder_blocks": model.decoder_num_heads}
  params: Params = {k: sd[k] for k in ("modality_a", "modality_v", "mask_token",
                                       "decoder_modality_a", "decoder_modality_v")}
  params["patch_embed_a"] = {"kernel": sd["patch_embed_a.proj.weight"].reshape(d, p * p).T,
                             "bias": sd["patch_embed_a.proj.bias"]}
  params["patch_embed_v"] = {
      "kernel": sd["patch_embed_v.proj.weight"].transpose(2, 3, 1, 0).reshape(p * p * 3, d),
      "bias": sd["patch_embed_v.proj.bias"]}
  for stack in ("blocks_a", "blocks_v", "blocks_u", "decoder_blocks"):
    i = 0
    while f"{stack}.{i}.attn.qkv.weight" in sd:
      params[f"{stack}_{i}"] = block(f"{stack}.{i}")
      i += 1
  for name in ("norm_a", "norm_v", "norm", "decoder_norm"):
    params[name] = norm(name)
  for name in ("decoder_embed", "decoder_pred_a", "decoder_pred_v"):
    params[name] = linear(name)
  return params
