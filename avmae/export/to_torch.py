"""Export a training checkpoint to PyTorch (`python -m avmae.export`, see __main__.py).

    python -m avmae.export --workdir=DIR [--step=N] [--format=F] --out=PATH

The formats are the method's (`Method.export`); CAV-MAE's (avmae/methods/cav_mae.py):
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

from avmae import extract, sharding, storage
from avmae.data import augment, dataset_info, errors
from avmae.export import files


def _preprocessing(config: Any) -> dict[str, Any]:
  """What a PyTorch user needs to feed the model as training did (torch_frontend.py)."""
  d = config.data
  out = {"audio_frames": d.audio_frames, "image_size": d.image_size,
         # Workdirs from before clips existed trained on one frame.
         "num_frames": d.get("num_frames", 1), "frame_stride": d.get("frame_stride", 1),
         "image_mean": augment.IMAGE_MEAN.tolist(), "image_std": augment.IMAGE_STD.tolist()}
  try:
    info = dataset_info.load(config.data.dir)
  except errors.SchemaError as e:  # a moved or deleted dataset must not block an export
    print(f"warning: no log-mel statistics in the metadata: {e}", flush=True)
    return out
  # Workdirs from before the choice existed normalised with the dataset's statistics.
  mean, std = dataset_info.log_mel_norm(info, d.get("log_mel_norm", "dataset"))
  out.update(log_mel_mean=mean, log_mel_std=std, features=info["features"])
  return out


def export(workdir: str, out: str, fmt: str = "", step: int | None = None,
           variant: str = "pretrain", num_classes: int = 527, module_prefix: bool = False,
           seed: int = 0, wrap: str = "") -> list[str]:
  """Writes checkpoint `step` (default: the latest) of the training `workdir` in the method's
  format `fmt` (default: its first); returns the written state_dict paths. `wrap` nests each
  .pth state_dict under that key (Audio-MAE's official checkpoints: "model")."""
  files._suffix(out)  # fail on a bad file name before loading anything
  if wrap and files._suffix(out) == ".safetensors":
    raise ValueError(f"--wrap={wrap!r} needs a .pth file: {out} is .safetensors (flat tensors)")
  config = extract.training_config(workdir)
  step = extract.saved_steps(workdir)[-1] if step is None else step
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  method, params = extract.load_params(config, mesh, workdir, step, seed)
  fmt = fmt or method.export_formats[0]
  if fmt not in method.export_formats:
    raise ValueError(f"--format {fmt!r}: the {config.method} model of {workdir} exports as "
                     f"one of {method.export_formats}")
  fingerprint = extract.fingerprint(params)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  meta = {"format": fmt, "source": {"workdir": str(storage.path(workdir)), "step": step,
                                    "params_fingerprint": fingerprint},
          "preprocessing": _preprocessing(config)}
  options = {"variant": variant, "num_classes": num_classes, "module_prefix": module_prefix,
             "seed": seed}
  stem, ext = os.path.splitext(out)
  written = []
  for suffix, state_dict, extra in method.export(params, fmt, options):
    path = f"{stem}{suffix}{ext}"
    # A method's own preprocessing facts (e.g. its pixel scaling) add to the shared ones.
    preprocessing = {**meta["preprocessing"], **extra.get("preprocessing", {})}
    files.save(path, state_dict, {**meta, **extra, "preprocessing": preprocessing,
                                  "wrapped_in": wrap or None}, wrap)
    written.append(path)
    size = storage.path(path).stat().length
    print(f"wrote {path} ({size / 2**20:.1f} MiB) and {path}.json", flush=True)
  return written
