"""Our CAV-MAE parameters <-> the official PyTorch state_dicts (YuanGongND/cav-mae) and timm.

NumPy arrays in and out (no torch here: the PyTorch side builds on these). Layouts:
  pretrain        official `CAVMAE` (encoders, shared block, decoder)
  finetune        official `CAVMAEFT` (encoders, shared block, `mlp_head`)
  finetune_audio  official `CAVMAEFTAudio` (audio encoder, shared block, `mlp_head`)
  timm            one modality's encoder as a timm `VisionTransformer` (`to_timm`)
Conversions, all exact:
  Dense kernel [in, out]                 -> Linear weight [out, in]
  patch_embed_a kernel [p*p, D] (f, t)   -> Conv2d weight [D, 1, p, p] (input [B, 1, F, T])
  patch_embed_v kernel [p*p*3, D] (r,c,ch) -> Conv2d weight [D, 3, p, p]
  clips (model.num_frames > 1, avmae's layout: there is no official one):
  patch_embed_v kernel [t*p*p*3, D] (time, r, c, ch) -> Conv3d weight [D, 3, t, p, p] over
  frames [B, 3, T, H, W]; pos_embed_v the 3-D sin-cos embedding of the (T/t, H/p, W/p) grid
  qkv kernel [D, 3, H, Dh]               -> qkv weight [3*H*Dh, D], rows ordered [3][H][Dh]
  out kernel [H, Dh, D]                  -> proj weight [D, H*Dh]
  LayerNorm scale/bias                   -> weight/bias
Frozen sin-cos position embeddings are constants here and buffers-like parameters there: they
are written on export and checked (not loaded) on import. Exports take either layer layout
(model.scan_layers); imports give the model's.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae import checkpoint, masking
from avmae.models.cav_mae import layer_stacks, video_pos_embedding
from avmae.models.vit import sincos_2d

Params = dict[str, Any]
_VIDEO_PREFIXES = ("modality_v", "pos_embed_v", "patch_embed_v", "blocks_v", "norm_v")
_BLOCK_NORMS = ("norm1", "norm1_a", "norm1_v")
_BLOCK_NORMS2 = ("norm2", "norm2_a", "norm2_v")


def prefixed(prefix: str, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The keys of a submodule's state_dict under its name `prefix`."""
  return {f"{prefix}.{k}": v for k, v in sd.items()}


def linear_state_dict(p: Params) -> dict[str, np.ndarray]:
  return {"weight": np.asarray(p["kernel"]).T, "bias": np.asarray(p["bias"])}


def norm_state_dict(p: Params) -> dict[str, np.ndarray]:
  return {"weight": np.asarray(p["scale"]), "bias": np.asarray(p["bias"])}


def attention_state_dict(p: Params) -> dict[str, np.ndarray]:
  """A vit.Attention's parameters as timm's attention (`qkv`, `proj`) state_dict."""
  qkv = np.asarray(p["qkv_kernel"])  # [D, 3, H, Dh]
  dim = qkv.shape[0]
  return {"qkv.weight": qkv.reshape(dim, -1).T, "qkv.bias": np.asarray(p["qkv_bias"]).reshape(-1),
          "proj.weight": np.asarray(p["out_kernel"]).reshape(-1, dim).T,
          "proj.bias": np.asarray(p["out_bias"])}


def block_state_dict(p: Params) -> dict[str, np.ndarray]:
  """A vit.Block's parameters as the timm / official block's state_dict (the modality norms
  only where the block has them)."""
  out: dict[str, np.ndarray] = {}
  for name in (n for n in _BLOCK_NORMS if n in p):
    out.update({f"{name}.{k}": v for k, v in norm_state_dict(p[name]).items()})
  out.update(prefixed("attn", attention_state_dict(p["attn"])))
  for name in (n for n in _BLOCK_NORMS2 if n in p):
    out.update({f"{name}.{k}": v for k, v in norm_state_dict(p[name]).items()})
  for fc in ("fc1", "fc2"):
    out.update({f"mlp.{fc}.{k}": v for k, v in linear_state_dict(p["mlp"][fc]).items()})
  return out


def _count(params: Params, prefix: str) -> int:
  return sum(1 for k in params if k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit())


def _unrolled(params: Params, model: Any) -> Params:
  """Parameters in the unrolled layer layout (`blocks_a_0`, ...), which official mirrors."""
  return checkpoint.convert_layers(params, layer_stacks(model), scan_layers=False)


def _pretrain_layout(params: Params, model: Any) -> dict[str, np.ndarray]:
  """The official `CAVMAE.state_dict()` (same keys, order, shapes) of our parameters."""
  params = _unrolled(params, model)
  p = model.patch_size
  f_grid, t_grid = model.mel_bins // p, model.audio_frames // p
  sd: dict[str, np.ndarray] = {}
  for name in ("modality_a", "modality_v"):
    sd[name] = np.asarray(params[name])
  sd["pos_embed_a"] = sincos_2d(model.embed_dim, f_grid, t_grid)[None]
  sd["pos_embed_v"] = video_pos_embedding(model.video_grid, model.embed_dim)[None]
  for name in ("mask_token", "decoder_modality_a", "decoder_modality_v"):
    sd[name] = np.asarray(params[name])
  sd["decoder_pos_embed_a"] = sincos_2d(model.decoder_embed_dim, f_grid, t_grid)[None]
  sd["decoder_pos_embed_v"] = video_pos_embedding(model.video_grid, model.decoder_embed_dim)[None]
  d = model.embed_dim
  ka = np.asarray(params["patch_embed_a"]["kernel"])  # [(f, t), D]
  sd["patch_embed_a.proj.weight"] = ka.T.reshape(d, 1, p, p)
  sd["patch_embed_a.proj.bias"] = np.asarray(params["patch_embed_a"]["bias"])
  kv = np.asarray(params["patch_embed_v"]["kernel"])
  if model.num_frames == 1:  # (row, col, ch)
    sd["patch_embed_v.proj.weight"] = kv.reshape(p, p, 3, d).transpose(3, 2, 0, 1)
  else:  # (time, row, col, ch)
    t = model.tubelet_size
    sd["patch_embed_v.proj.weight"] = kv.reshape(t, p, p, 3, d).transpose(4, 3, 0, 1, 2)
  sd["patch_embed_v.proj.bias"] = np.asarray(params["patch_embed_v"]["bias"])
  for stack in ("blocks_a", "blocks_v", "blocks_u"):
    for i in range(_count(params, stack)):
      sd.update(prefixed(f"{stack}.{i}", block_state_dict(params[f"{stack}_{i}"])))
  for name in ("norm_a", "norm_v", "norm"):
    sd.update(prefixed(name, norm_state_dict(params[name])))
  sd.update(prefixed("decoder_embed", linear_state_dict(params["decoder_embed"])))
  for i in range(_count(params, "decoder_blocks")):
    sd.update({f"decoder_blocks.{i}.{k}": v
               for k, v in block_state_dict(params[f"decoder_blocks_{i}"]).items()})
  sd.update({f"decoder_norm.{k}": v for k, v in norm_state_dict(params["decoder_norm"]).items()})
  for name in ("decoder_pred_a", "decoder_pred_v"):
    sd.update({f"{name}.{k}": v for k, v in linear_state_dict(params[name]).items()})
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _is_decoder(key: str) -> bool:
  return key == "mask_token" or key.startswith("decoder_")


def _is_video(key: str) -> bool:
  return key.split(".")[0] in _VIDEO_PREFIXES


# Which keys of the pretraining layout each official model has (in the same order).
VARIANTS = {
    "pretrain": lambda key: True,
    "finetune": lambda key: not _is_decoder(key),
    "finetune_audio": lambda key: not _is_decoder(key) and not _is_video(key),
}


def init_head(embed_dim: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A fresh `mlp_head` (LayerNorm, Linear) initialised as the official finetuning model
  does (LayerNorm 1/0, Xavier-uniform weight, zero bias): the finetuning layouts need one and
  a pretrained checkpoint has none."""
  bound = np.sqrt(6.0 / (embed_dim + num_classes))
  weight = np.random.default_rng(seed).uniform(-bound, bound, (num_classes, embed_dim))
  return {"mlp_head.0.weight": np.ones(embed_dim, np.float32),
          "mlp_head.0.bias": np.zeros(embed_dim, np.float32),
          "mlp_head.1.weight": weight.astype(np.float32),
          "mlp_head.1.bias": np.zeros(num_classes, np.float32)}


def to_official(params: Params, model: Any, variant: str = "pretrain",
                head: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """The official model's state_dict (same keys, order, shapes) of our parameters.

  `model` is the CAVMAE module (or its config) for the geometry: patch_size, audio grid,
  image_size, embed widths. The finetuning variants need `head` (mlp_head.* arrays, e.g.
  from `init_head`); the pretraining layout takes none.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown CAV-MAE layout {variant!r}; one of {sorted(VARIANTS)}")
  if (head is None) != (variant == "pretrain"):
    raise ValueError(f"layout {variant!r} {'needs' if head is None else 'takes no'} "
                     "mlp_head weights")
  sd = {k: v for k, v in _pretrain_layout(params, model).items() if VARIANTS[variant](k)}
  if head is not None:
    classes = len(np.asarray(head.get("mlp_head.1.bias", ())))
    want = {k: v.shape for k, v in init_head(model.embed_dim, classes).items()}
    got = {k: np.shape(v) for k, v in head.items()}
    if got != want:
      raise ValueError(f"mlp_head needs {want} for embed_dim {model.embed_dim}, got {got}")
    sd.update({k: np.ascontiguousarray(head[k], np.float32) for k in want})
  return sd


def to_timm(params: Params, model: Any, modality: str) -> tuple[dict[str, np.ndarray],
                                                                dict[str, Any]]:
  """One modality's encoder (its blocks, then the shared block as that modality passes
  through it, then norm_a / norm_v) as a timm `VisionTransformer` state_dict, and the
  constructor arguments that model needs (see `timm_kwargs`). The modality embedding is folded
  into `pos_embed` (timm adds one position embedding). Audio input is the normalised log-mel
  transposed, [B, 1, mel_bins, frames]; video [B, 3, H, W]."""
  if modality not in ("a", "v"):
    raise ValueError(f"modality must be 'a' or 'v', got {modality!r}")
  if model.num_frames > 1:
    raise ValueError(f"a model of {model.num_frames}-frame clips has no timm layout (timm has "
                     "no video ViT): export --format=cav_mae, which avmae's PyTorch module "
                     "(avmae/export/torch_cav_mae.py) loads")
  params = _unrolled(params, model)
  sd_all = _pretrain_layout(params, model)
  blocks = [f"blocks_{modality}.{i}" for i in range(_count(params, f"blocks_{modality}"))]
  shared = [f"blocks_u.{i}" for i in range(_count(params, "blocks_u"))]
  p = model.patch_size
  sd = {"pos_embed": sd_all[f"pos_embed_{modality}"] + sd_all[f"modality_{modality}"],
        "patch_embed.proj.weight": sd_all[f"patch_embed_{modality}.proj.weight"],
        "patch_embed.proj.bias": sd_all[f"patch_embed_{modality}.proj.bias"]}
  for i, (prefix, suffix) in enumerate([(b, "") for b in blocks] +
                                       [(b, f"_{modality}") for b in shared]):
    for key in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
      src = key + suffix if key.startswith("norm") else key
      for leaf in ("weight", "bias"):
        sd[f"blocks.{i}.{key}.{leaf}"] = sd_all[f"{prefix}.{src}.{leaf}"]
  for leaf in ("weight", "bias"):
    sd[f"norm.{leaf}"] = sd_all[f"norm_{modality}.{leaf}"]
  image = ((model.mel_bins, model.audio_frames) if modality == "a"
           else (model.image_size, model.image_size))
  args = {"img_size": list(image), "patch_size": p, "in_chans": 1 if modality == "a" else 3,
          "num_classes": 0, "global_pool": "avg", "embed_dim": model.embed_dim,
          "depth": len(blocks) + len(shared), "num_heads": model.num_heads,
          "mlp_ratio": model.mlp_ratio, "class_token": False, "fc_norm": False,
          "norm_eps": 1e-5}
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, args


def timm_kwargs(args: dict[str, Any]) -> dict[str, Any]:
  """`VisionTransformer(**timm_kwargs(args))` for the `args` of `to_timm` (LayerNorm eps 1e-5,
  PyTorch's default, where timm defaults to 1e-6)."""
  import torch  # lazy: only the torch side needs it
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()
            if k != "norm_eps"}
  kwargs["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=args["norm_eps"])
  return kwargs


def _zeros(model: Any) -> Params:
  """Zero parameters of `model` (a CAVMAE module): the reference for the keys and shapes an
  import must have (about 0.8 GB at base size, once per import)."""
  batch_a = jnp.zeros((1, model.audio_frames, model.mel_bins))
  frames = jnp.zeros((1, *model.frames_shape))
  keep_a = masking.keep_all(1, model.num_audio_tokens)
  keep_v = masking.keep_all(1, model.num_video_tokens)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), batch_a, frames, keep_a, keep_v))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.meta.unbox(boxed)["params"])


# Keys of an `IN-initial.pth` (the official adapt_vmae_weights.py output) that CAVMAE does not
# define; the official loader's strict=False ignores them, so does the import (listing them).
IGNORED_EXTRA_KEYS = ("cls_token_a", "cls_token_v", "cls_token_av")


def is_mae_vit(state_dict: dict[str, Any]) -> bool:
  """A facebookresearch/mae ViT checkpoint (blocks.N.*, patch_embed, decoder_*), not CAVMAE."""
  return any(k.removeprefix("module.").startswith("blocks.0.") for k in state_dict)


def mae_vit_to_official(mae: dict[str, np.ndarray], initial: dict[str, np.ndarray],
                        modality_specific_depth: int, audio_values: int
                        ) -> tuple[dict[str, np.ndarray], list[str]]:
  """The official adapt_vmae_weights.py: an ImageNet MAE (ViT encoder + decoder) as a CAVMAE
  state_dict. Names both models have load as they are (its strict=False load: mask_token,
  norm, decoder_embed, decoder_blocks, decoder_norm); the first `modality_specific_depth`
  blocks go to both blocks_a and blocks_v, the rest to blocks_u with their norms copied to the
  _a / _v norms; norm to norm_a and norm_v; pos_embed / decoder_pos_embed without the cls row
  to the video ones; the audio patch embedding is the RGB kernel summed over channels; the
  audio head is the first `audio_values` rows of the image head. Every other key keeps its
  `initial` value (a CAVMAE state_dict of a fresh initialisation). Returns the state_dict and
  the keys left at `initial`."""
  sd = dict(initial)
  loaded = {k: v for k, v in mae.items() if k in initial and not k.startswith("blocks.")}
  depth = 1 + max(int(k.split(".")[1]) for k in mae if k.startswith("blocks."))
  for key, value in mae.items():
    if not key.startswith("blocks."):
      continue
    _, index, rest = key.split(".", 2)
    i = int(index)
    if i < modality_specific_depth:
      loaded.update({f"blocks_a.{i}.{rest}": value, f"blocks_v.{i}.{rest}": value})
    else:
      shared = f"blocks_u.{i - modality_specific_depth}"
      loaded[f"{shared}.{rest}"] = value
      if rest.startswith(("norm1.", "norm2.")):
        norm, leaf = rest.split(".")
        loaded.update({f"{shared}.{norm}_a.{leaf}": value, f"{shared}.{norm}_v.{leaf}": value})
  shared = len({k.split(".")[1] for k in initial if k.startswith("blocks_u.")})
  if depth != modality_specific_depth + shared:
    raise ValueError(f"the MAE ViT has {depth} blocks; this CAVMAE takes "
                     f"{modality_specific_depth} per modality and {shared} shared")
  loaded.update({f"norm_{m}.{leaf}": mae[f"norm.{leaf}"] for m in "av" for leaf in
                 ("weight", "bias")})
  loaded["pos_embed_v"] = mae["pos_embed"][:, 1:]
  loaded["decoder_pos_embed_v"] = mae["decoder_pos_embed"][:, 1:]
  loaded["patch_embed_a.proj.weight"] = mae["patch_embed.proj.weight"].sum(1, keepdims=True)
  loaded["patch_embed_a.proj.bias"] = mae["patch_embed.proj.bias"]
  loaded["patch_embed_v.proj.weight"] = mae["patch_embed.proj.weight"]
  loaded["patch_embed_v.proj.bias"] = mae["patch_embed.proj.bias"]
  loaded["decoder_pred_a.weight"] = mae["decoder_pred.weight"][:audio_values]
  loaded["decoder_pred_a.bias"] = mae["decoder_pred.bias"][:audio_values]
  loaded["decoder_pred_v.weight"] = mae["decoder_pred.weight"]
  loaded["decoder_pred_v.bias"] = mae["decoder_pred.bias"]
  unknown = sorted(set(loaded) - set(initial))
  if unknown:
    raise ValueError(f"the MAE ViT does not fit this CAVMAE: {unknown[:5]} (a different depth?)")
  sd.update(loaded)
  return sd, sorted(set(initial) - set(loaded))


def from_official(state_dict: dict[str, np.ndarray], model: Any,
                  initial: Callable[[], Params] | None = None) -> Params:
  """Our parameters (in the model's layer layout) from an official `CAVMAE` state_dict (a
  "module." prefix is stripped) for `model` (a CAVMAE module). Keys and shapes must be exactly
  the model's; the frozen position embeddings must equal our sin-cos constants (trained ones
  cannot be represented). Raises ValueError naming what does not fit.

  Also accepted, as the official pretraining starts from them: an `IN-initial.pth` (its
  cls_token_a/v/av, which CAVMAE lacks, are listed and ignored) and a facebookresearch/mae
  ViT checkpoint, mapped as adapt_vmae_weights.py does (`mae_vit_to_official`; what it does
  not cover comes from `initial()`, our initialisation, and is listed)."""
  sd = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state_dict.items()}
  if is_mae_vit(sd):
    if initial is None:
      raise ValueError("a MAE ViT checkpoint needs the model's initialisation for the keys it "
                       "does not cover")
    sd, kept = mae_vit_to_official(sd, _pretrain_layout(initial(), model),
                                   model.modality_specific_depth, model.patch_size ** 2)
    print(f"MAE ViT mapped as adapt_vmae_weights.py; initialised, not loaded: {kept}",
          flush=True)
  ignored = [k for k in IGNORED_EXTRA_KEYS if k in sd]
  if ignored:
    print(f"ignored keys CAVMAE does not have (as the official strict=False load): {ignored}",
          flush=True)
    sd = {k: v for k, v in sd.items() if k not in ignored}
  if "mlp_head.1.weight" in sd or "decoder_embed.weight" not in sd:
    raise ValueError("state_dict is not the official pretraining model CAVMAE (it has "
                     f"{'an mlp_head' if 'mlp_head.1.weight' in sd else 'no decoder'}: a "
                     "finetuning model?); only CAVMAE checkpoints can be imported")
  expected = _pretrain_layout(_zeros(model), model)
  missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
  if missing or extra:
    raise ValueError(f"state_dict does not match the official CAVMAE layout of this model: "
                     f"missing {missing[:5]}, unexpected {extra[:5]} (a different depth?)")
  for key, want in expected.items():
    if sd[key].shape != want.shape:
      raise ValueError(f"state_dict {key} has shape {sd[key].shape}, this model needs "
                       f"{want.shape} (a different size?)")
  for key in ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v"):
    if not np.allclose(sd[key], expected[key], atol=1e-5):
      raise ValueError(f"state_dict {key} is not the fixed sin-cos embedding (trained position "
                       "embeddings are not supported by this model)")
  return checkpoint.convert_layers(_template(sd, model), layer_stacks(model), model.scan_layers)


def linear_params(sd: dict[str, np.ndarray], prefix: str) -> Params:
  """Inverse of `linear_state_dict` for the Linear `prefix`."""
  return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}


def norm_params(sd: dict[str, np.ndarray], prefix: str) -> Params:
  """Inverse of `norm_state_dict` for the LayerNorm `prefix`."""
  return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}


def attention_params(sd: dict[str, np.ndarray], prefix: str, heads: int) -> Params:
  """A vit.Attention's parameters from the timm attention `prefix` (`qkv`, `proj`)."""
  w = sd[f"{prefix}.qkv.weight"]  # [3*H*Dh, D]
  dim, head_dim = w.shape[1], w.shape[0] // 3 // heads
  return {"qkv_kernel": w.T.reshape(dim, 3, heads, head_dim),
          "qkv_bias": sd[f"{prefix}.qkv.bias"].reshape(3, heads, head_dim),
          "out_kernel": sd[f"{prefix}.proj.weight"].T.reshape(heads, head_dim, dim),
          "out_bias": sd[f"{prefix}.proj.bias"]}


def block_params(sd: dict[str, np.ndarray], prefix: str, heads: int) -> Params:
  """Inverse of `block_state_dict` for the block `prefix` (the head count is not in a
  state_dict: it comes from the model's config)."""
  out = {n: norm_params(sd, f"{prefix}.{n}") for n in _BLOCK_NORMS + _BLOCK_NORMS2
         if f"{prefix}.{n}.weight" in sd}
  out["attn"] = attention_params(sd, f"{prefix}.attn", heads)
  out["mlp"] = {fc: linear_params(sd, f"{prefix}.mlp.{fc}") for fc in ("fc1", "fc2")}
  return out


def _template(sd: dict[str, np.ndarray], model: Any) -> Params:
  """Inverse of the conversions in `to_official` (head counts from `model`)."""
  linear = functools.partial(linear_params, sd)
  norm = functools.partial(norm_params, sd)
  block = lambda prefix: block_params(sd, prefix, sd_heads[prefix.split(".")[0]])

  d = sd["patch_embed_a.proj.weight"].shape[0]
  p = sd["patch_embed_a.proj.weight"].shape[-1]
  # Head counts are not in a state_dict: they come from the model's config.
  sd_heads = {"blocks_a": model.num_heads, "blocks_v": model.num_heads,
              "blocks_u": model.num_heads, "decoder_blocks": model.decoder_num_heads}
  params: Params = {k: sd[k] for k in ("modality_a", "modality_v", "mask_token",
                                       "decoder_modality_a", "decoder_modality_v")}
  params["patch_embed_a"] = {"kernel": sd["patch_embed_a.proj.weight"].reshape(d, p * p).T,
                             "bias": sd["patch_embed_a.proj.bias"]}
  wv = sd["patch_embed_v.proj.weight"]  # [D, 3, p, p] or, for clips, [D, 3, t, p, p]
  order = (2, 3, 1, 0) if wv.ndim == 4 else (2, 3, 4, 1, 0)
  params["patch_embed_v"] = {"kernel": wv.transpose(order).reshape(-1, d),
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


def export_formats(model: Any) -> tuple[str, ...]:
  """The formats `export_files` writes for `model`: timm has no video ViT for clips."""
  return ("cav_mae",) if model.num_frames > 1 else ("cav_mae", "timm")


def torch_args(model_config: Any) -> dict[str, Any]:
  """config.model without what only concerns training (`remat`, `scan_layers`): the arguments
  the PyTorch CAVMAE (torch_cav_mae.py) takes."""
  return {k: v for k, v in model_config.to_dict().items() if k not in ("remat", "scan_layers")}


def export_files(params: Params, model: Any, model_config: Any, fmt: str,
                 options: dict[str, Any]) -> list[tuple[str, dict[str, np.ndarray], dict]]:
  """CAV-MAE's export formats (avmae/export/to_torch.py): (file suffix, state_dict, metadata)
  per file. "cav_mae": the official layout of options["variant"] (clips: avmae's layout, named
  in the metadata); "timm": the two encoders as timm ViTs."""
  if fmt == "timm":
    out = []
    for modality, name in (("a", "audio"), ("v", "video")):
      sd, args = to_timm(params, model, modality)
      out.append((f"_{name}", sd, {"encoder": name, "timm_args": args}))
    return out
  variant, num_classes, seed = options["variant"], options["num_classes"], options["seed"]
  head = None
  if variant != "pretrain":
    head = init_head(model.embed_dim, num_classes, seed)
    print(f"mlp_head ({num_classes} classes) is freshly initialised (seed {seed}): "
          "finetune it", flush=True)
  sd = to_official(params, model, variant, head)
  if options["module_prefix"]:
    sd = {"module." + k: v for k, v in sd.items()}
  args = dict(torch_args(model_config), decoder=variant == "pretrain",
              video=variant != "finetune_audio",
              num_classes=0 if variant == "pretrain" else num_classes)
  layout = ("official CAV-MAE state_dict" if model.num_frames == 1 else
            f"avmae's CAV-MAE layout for clips of {model.num_frames} frames (no official one "
            f"exists): patch_embed_v.proj is a Conv3d over [B, 3, T, H, W] with "
            f"{model.tubelet_size}x{model.patch_size}x{model.patch_size} tubelets, time-major "
            "tokens, pos_embed_v 3-D sin-cos (D/4 time, 3D/4 2-D); load it with "
            "avmae/export/torch_cav_mae.py CAVMAE(**torch_cav_mae_args)")
  return [("", sd, {"variant": variant, "module_prefix": options["module_prefix"],
                    "layout": layout, "torch_cav_mae_args": args})]
