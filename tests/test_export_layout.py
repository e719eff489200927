"""Our CAV-MAE parameters map exactly onto the official state_dict layout and back."""

import pathlib

import jax
import numpy as np
import pytest

from avmae import sharding
from avmae.export import cav_mae_layout
from avmae.methods import METHODS
from configs import cav_mae

# The official listing (shared/fixtures/reference_state_dicts/cav_mae.txt), kept in the repo.
FIXTURE = pathlib.Path(__file__).resolve().parent / "golden" / "cav_mae_state_dict.txt"


def _official_listing():
  """(key, shape) of the official CAVMAE pretraining model, in state_dict order."""
  rows = []
  for line in FIXTURE.read_text().splitlines():
    if line.startswith("# CAVMAEFT("):
      break  # the finetuning models follow
    if line and not line.startswith("#"):
      key, shape, _ = line.split("\t")
      rows.append((key, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())))
  return rows


def _params(size):
  config = cav_mae.get_config(size)
  config.data.batch_size = 1
  method = METHODS[config.method](config)
  return method.model, jax.jit(
      lambda: method.init(jax.random.key(0), method.example_batch(1))["params"])


def test_base_export_has_the_official_keys_order_and_shapes():
  model, init = _params("base")
  abstract = sharding.strip_logical_names(jax.eval_shape(init))
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  sd = cav_mae_layout.to_official(zeros, model)
  official = _official_listing()
  assert len(official) == 647
  assert [(k, v.shape) for k, v in sd.items()] == official


def test_round_trip_is_exact_and_values_land_in_the_right_places():
  model, init = _params("tiny")
  params = jax.tree.map(np.asarray, sharding.strip_logical_names(init()))
  sd = cav_mae_layout.to_official(params, model)
  back = cav_mae_layout.from_official({"module." + k: v for k, v in sd.items()}, model)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Spot checks against the PyTorch conventions.
  p = model.patch_size
  qkv = params["blocks_a_0"]["attn"]["qkv_kernel"]  # [D, 3, H, Dh]
  h, dh = qkv.shape[2], qkv.shape[3]
  row = 1 * h * dh + 2 * dh + 3  # k of head 2, channel 3: rows are [3][H][Dh]
  np.testing.assert_array_equal(sd["blocks_a.0.attn.qkv.weight"][row], qkv[:, 1, 2, 3])
  kv = params["patch_embed_v"]["kernel"]  # rows (row, col, channel)
  np.testing.assert_array_equal(sd["patch_embed_v.proj.weight"][5, 2, 1, 3],
                                kv[(1 * p + 3) * 3 + 2, 5])
  ka = params["patch_embed_a"]["kernel"]  # rows (freq, time); conv input is [B, 1, F, T]
  np.testing.assert_array_equal(sd["patch_embed_a.proj.weight"][7, 0, 2, 5], ka[2 * p + 5, 7])


def test_a_clip_model_round_trips_through_avmaes_layout():
  model, init = _params("tiny_video")
  params = jax.tree.map(np.asarray, sharding.strip_logical_names(init()))
  sd = cav_mae_layout.to_official(params, model)
  back = cav_mae_layout.from_official(sd, model)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  p, t = model.patch_size, model.tubelet_size
  kv = params["patch_embed_v"]["kernel"]  # rows (time, row, col, channel)
  assert sd["patch_embed_v.proj.weight"].shape == (64, 3, t, p, p)
  np.testing.assert_array_equal(sd["patch_embed_v.proj.weight"][5, 2, 1, 4, 3],
                                kv[((1 * p + 4) * p + 3) * 3 + 2, 5])
  assert sd["pos_embed_v"].shape == (1, 4 * 8 * 8, 64)
  with pytest.raises(ValueError, match="8-frame clips has no timm layout"):
    cav_mae_layout.to_timm(params, model, "v")


def test_import_rejects_a_foreign_layout():
  model, init = _params("tiny")
  params = jax.tree.map(np.asarray, sharding.strip_logical_names(init()))
  sd = cav_mae_layout.to_official(params, model)
  del sd["norm_a.weight"]
  with pytest.raises(ValueError, match=r"missing \['norm_a.weight'\]"):
    cav_mae_layout.from_official(sd, model)
  sd = cav_mae_layout.to_official(params, model)
  sd["pos_embed_a"] = sd["pos_embed_a"] + 1
  with pytest.raises(ValueError, match="pos_embed_a is not the fixed sin-cos embedding"):
    cav_mae_layout.from_official(sd, model)
