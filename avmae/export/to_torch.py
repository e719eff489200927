"""Export a training checkpoint to PyTorch (`python -m avmae.export`, see __main__.py).

    python -m avmae.export --workdir=DIR [--step=N] --format=cav_mae|timm --out=PATH

`--format=cav_mae` writes the official CAV-MAE state_dict (`--variant=pretrain`: `CAVMAE`;
`finetune`: `CAVMAEFT`; `finetune_audio`: `CAVMAEFTAudio`, whose `mlp_head` is freshly
initialised with `--num_classes` outputs), optionally with DataParallel's `module.` prefix.
`--format=timm` writes the audio and the video encoders as two timm `VisionTransformer`
state_dicts, `<out>_audio<ext>` and `<out>_video<ext>`. PATH ends in `.safetensors` or `.pth`;
`<file>.json` beside each records the model arguments, the source checkpoint and the input
preprocessing (log-mel statistics, fbank options, image statistics).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from avmae import extract, sharding
from avmae.data import augment, dataset_info, errors
from avmae.export import cav_mae_layout, files

FORMATS = ("cav_mae", "timm")


def _preprocessing(config: Any) -> dict[str, Any]:
  """What a PyTorch user needs to feed the model as training did (torch_frontend.py)."""
  out = {"audio_frames": config.model.audio_frames, "image_size": config.model.image_size,
         "image_mean": augment.IMAGE_MEAN.tolist(), "image_std": augment.IMAGE_STD.tolist()}
  try:
    info = dataset_info.load(config.data.dir)
  except errors.SchemaError as e:  # a moved or deleted dataset must not block an export
    print(f"warning: no log-mel statistics in the metadata: {e}", flush=True)
    return out
  out.update(log_mel_mean=info["log_mel_stats"]["mean"], log_mel_std=info["log_mel_stats"]["std"],
             features=info["features"])
  return out


def architecture(model_config: Any) -> dict[str, Any]:
  """config.model without what only concerns training (`remat`, `scan_layers`): the arguments
  the PyTorch CAVMAE (torch_cav_mae.py) takes."""
  return {k: v for k, v in model_config.to_dict().items() if k not in ("remat", "scan_layers")}


def export(workdir: str, out: str, fmt: str = "cav_mae", step: int | None = None,
           variant: str = "pretrain", num_classes: int = 527, module_prefix: bool = False,
           seed: int = 0) -> list[str]:
  """Writes checkpoint `step` (default: the latest) of the training `workdir`; returns the
  written state_dict paths."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown --format {fmt!r}; one of {FORMATS}")
  files._suffix(out)  # fail on a bad file name before loading anything
  config = extract.training_config(workdir)
  step = extract.saved_steps(workdir)[-1] if step is None else step
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  method, params = extract.load_params(config, mesh, workdir, step, seed)
  model = method.model
  fingerprint = extract.fingerprint(params)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  meta = {"format": fmt, "source": {"workdir": os.path.abspath(workdir), "step": step,
                                    "params_fingerprint": fingerprint},
          "preprocessing": _preprocessing(config)}
  written = []
  if fmt == "cav_mae":
    head = None
    if variant != "pretrain":
      head = cav_mae_layout.init_head(model.embed_dim, num_classes, seed)
      print(f"mlp_head ({num_classes} classes) is freshly initialised (seed {seed}): "
            "finetune it", flush=True)
    sd = cav_mae_layout.to_official(params, model, variant, head)
    if module_prefix:
      sd = {"module." + k: v for k, v in sd.items()}
    args = dict(architecture(config.model), decoder=variant == "pretrain",
                video=variant != "finetune_audio",
                num_classes=0 if variant == "pretrain" else num_classes)
    layout = ("official CAV-MAE state_dict" if model.num_frames == 1 else
              f"avmae's CAV-MAE layout for clips of {model.num_frames} frames (no official "
              f"one exists): patch_embed_v.proj is a Conv3d over [B, 3, T, H, W] with "
              f"{model.tubelet_size}x{model.patch_size}x{model.patch_size} tubelets, "
              "time-major tokens, pos_embed_v 3-D sin-cos (D/4 time, 3D/4 2-D); load it with "
              "avmae/export/torch_cav_mae.py CAVMAE(**torch_cav_mae_args)")
    files.save(out, sd, dict(meta, variant=variant, module_prefix=module_prefix, layout=layout,
                             torch_cav_mae_args=args))
    written.append(out)
  else:
    stem, ext = os.path.splitext(out)
    for modality, name in (("a", "audio"), ("v", "video")):
      sd, args = cav_mae_layout.to_timm(params, model, modality)
      path = f"{stem}_{name}{ext}"
      files.save(path, sd, dict(meta, encoder=name, timm_args=args))
      written.append(path)
  for path in written:
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) and {path}.json", flush=True)
  return written
