"""State_dict files: `.safetensors` and PyTorch pickles (`.pth`, `.pt`, `.bin`), NumPy in and out.

A `.pth` holds a plain state_dict (an ordered dict of tensors), as the official CAV-MAE code
saves and loads; `.safetensors` stores the same tensors (keys sorted: the format keeps no
order) with our metadata inside. Both get a `<file>.json` beside them with that metadata
(model arguments, source checkpoint, input preprocessing).
"""

from __future__ import annotations

import collections
import io
import json
import os
from typing import Any

import numpy as np

from avmae import storage

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Containers other projects wrap their state_dicts in (Audio-MAE: "model").
_WRAPPERS = ("model", "state_dict", "module")


def _suffix(path: str) -> str:
  suffix = os.path.splitext(path)[1]
  if suffix not in SUFFIXES:
    raise ValueError(f"{path}: unknown state_dict file type {suffix!r}; use one of {SUFFIXES}")
  return suffix


def save(path: str, state_dict: dict[str, np.ndarray], metadata: dict[str, Any],
         wrap: str = "") -> None:
  """Writes `state_dict` (order kept in .pth; `wrap`: a .pth holding {wrap: state_dict}) and
  `<path>.json`, each whole or not at all (`storage.write`); `path` may be on a bucket."""
  import torch  # lazy: export is the only torch user
  suffix = _suffix(path)
  tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v, order="C")))  # a copy
                                    for k, v in state_dict.items())
  if suffix == ".safetensors":
    from safetensors.torch import save as safetensors_bytes
    data = safetensors_bytes(tensors, metadata={"avmae": json.dumps(metadata)})
  else:
    buffer = io.BytesIO()
    torch.save({wrap: tensors} if wrap else tensors, buffer)
    data = buffer.getvalue()
  storage.write(path, data)
  storage.write(path + ".json", json.dumps(metadata, indent=2))


def load(path: str) -> collections.OrderedDict[str, np.ndarray]:
  """The state_dict in `path` as float/int NumPy arrays, in the file's order. Accepts a plain
  state_dict or one wrapped in {"model" | "state_dict" | "module": ...}; loads pickles with
  `weights_only=True` (no code runs). Errors name the file and what is wrong."""
  import torch
  suffix = _suffix(path)
  if not storage.path(path).is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  data = storage.path(path).read_bytes()
  try:
    if suffix == ".safetensors":
      from safetensors.torch import load
      obj = load(data)
    else:
      obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  except Exception as e:  # torch/safetensors raise many types for damaged files
    raise ValueError(f"{path}: cannot read it as a {suffix} state_dict "
                     f"({type(e).__name__}: {e})") from e
  for key in _WRAPPERS:
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors")
  out = collections.OrderedDict()
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__})")
    out[key] = value.detach().cpu().numpy()
  return out
