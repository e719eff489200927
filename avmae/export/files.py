"""State_dict files: `.safetensors` and PyTorch pickles (`.pth`, `.pt`, `.bin`), NumPy in and out.

A `.pth` holds a plain state_dict (an ordered dict of tensors), as the official CAV-MAE code
saves and loads; `.safetensors` stores the same tensors (keys sorted: the format keeps no
order) with our metadata inside. Both get a `<file>.json` beside them with that metadata
(model arguments, source checkpoint, input preprocessing).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

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
  `<path>.json`; atomically (tmp + rename)."""
  import torch  # lazy: export is the only torch user
  suffix = _suffix(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v, order="C")))  # a copy
                                    for k, v in state_dict.items())
  tmp = path + ".tmp"
  if suffix == ".safetensors":
    from safetensors.torch import save_file
    save_file(tensors, tmp, metadata={"avmae": json.dumps(metadata)})
  else:
    torch.save({wrap: tensors} if wrap else tensors, tmp)
  os.replace(tmp, path)
  with open(path + ".json", "w") as f:
    json.dump(metadata, f, indent=2)


def load(path: str) -> collections.OrderedDict[str, np.ndarray]:
  """The state_dict in `path` as float/int NumPy arrays, in the file's order. Accepts a plain
  state_dict or one wrapped in {"model" | "state_dict" | "module": ...}; loads pickles with
  `weights_only=True` (no code runs). Errors name the file and what is wrong."""
  import torch
  suffix = _suffix(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  try:
    if suffix == ".safetensors":
      from safetensors.torch import load_file
      obj = load_file(path)
    else:
      obj = torch.load(path, map_location="cpu", weights_only=True)
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
