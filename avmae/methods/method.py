"""What a pretraining method gives the tools that drive it (trainer, probe, export, AOT).

A method is one module under avmae/methods/ with `build(config) -> Method`. The tools use
only these fields: they never name a method's batch keys or model fields.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

Batch = dict[str, jax.Array]
# (ok, config key, why): a failed check reads "config.<key>=<why>".
Check = tuple[bool, str, str]


class Method(NamedTuple):
  model: Any  # the flax module; export and checkpoint layouts read it
  init: Callable[[jax.Array, Batch], Any]  # (key, batch) -> boxed variables
  # (params, batch, example keys [B]) -> (loss, metrics)
  loss_fn: Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
  # (params, batch, key) -> arrays for `plot_reconstructions`
  reconstruct: Callable[[Any, Batch, jax.Array], dict[str, jax.Array]]
  plot_reconstructions: Callable[[dict[str, Any], str, str], None]  # (images, path, title)
  train_step_flops: float
  # example keys [B] -> the masks loss_fn draws with them (for peers, e.g. torch)
  masks: Callable[[jax.Array], tuple[Any, ...]]
  example_batch: Callable[[int], Batch]  # batch size -> zeros of the step's input shapes
  # (dataset_info, mesh) -> checks of the config against the data and the mesh
  config_checks: Callable[[dict[str, Any], jax.sharding.Mesh], list[Check]]
  # (params, batch) -> {mode: [B, D], "<mode>_layers": [B, L, D]} frozen probe features
  features: Callable[[Any, Batch], dict[str, jax.Array]]
  retrieval: dict[str, tuple[str, str]]  # direction name -> (query mode, gallery mode)
  export_formats: tuple[str, ...]  # PyTorch layouts; the first is the default
  # (params as NumPy, format, options) -> [(file-name suffix, state_dict, metadata)]
  export: Callable[[Any, str, dict[str, Any]], list[tuple[str, dict[str, Any], dict]]]
  # state_dict (NumPy) of the method's official PyTorch model -> params, raising ValueError
  # naming the key that does not fit (avmae.import_torch); None: no official layout exists
  import_state_dict: Callable[[dict[str, Any]], Any] | None


def raise_failed(checks: list[Check]) -> None:
  """Raises ValueError for the first failed check, naming its config key."""
  for ok, key, why in checks:
    if not ok:
      raise ValueError(f"config.{key}={why}")

