"""Clips of many frames: sampling, tubelets, 3-D position embeddings, tube masks, the
per-tubelet target, and the one-frame model unchanged."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avmae import losses, masking, train
from avmae.data import dataset_info, errors, pipeline, schema
from avmae.data.augment import normalize_image
from avmae.data.source import TFRecordSource
from avmae.methods import METHODS
from avmae.models.vit import sincos_2d, sincos_3d
from configs import cav_mae
from data_prep import make_synthetic

HERE = os.path.dirname(__file__)


def _spec(**values) -> pipeline.ExampleSpec:
  defaults = {f.name: None for f in dataclasses.fields(pipeline.ExampleSpec)}
  return pipeline.ExampleSpec(**{**defaults, "all_frames": False, "frames_per_clip": 16,
                                 "train": True, "num_frames": 4, "frame_stride": 2, **values})


def test_a_clip_is_num_frames_frames_stride_apart_jittered_in_training_centred_in_eval():
  spec = _spec()
  starts = set()
  for seed in range(200):
    idx = pipeline.clip_frames(16, spec, np.random.default_rng(seed), "r")
    np.testing.assert_array_equal(np.diff(idx), [2, 2, 2])
    assert 0 <= idx[0] and idx[-1] < 16
    starts.add(int(idx[0]))
    # Determinism: the same generator state, the same clip.
    np.testing.assert_array_equal(idx, pipeline.clip_frames(16, spec, np.random.default_rng(seed),
                                                            "r"))
  assert starts == set(range(10))  # every start from 0 to 16 - 7
  evaluation = _spec(train=False)
  for n, first in ((16, 5), (7, 0), (8, 1), (9, 1)):
    idx = pipeline.clip_frames(n, evaluation, np.random.default_rng(0), "r")
    assert idx[0] == first and idx[-1] == first + 6, (n, idx)
  # One frame: official CAV-MAE's middle frame in evaluation.
  assert pipeline.clip_frames(8, _spec(train=False, num_frames=1), None, "r").tolist() == [4]
  with pytest.raises(errors.SchemaError, match=r"shard-0: record has 6 frames; "
                     r"data.num_frames=4 at data.frame_stride=2 spans 7"):
    pipeline.clip_frames(6, spec, np.random.default_rng(0), "shard-0")


def test_the_pipeline_gives_clips_of_the_records_frames(tmp_path):
  data = str(tmp_path / "data")
  make_synthetic.make_synthetic(data, num_train=4, num_eval=4, num_shards=1, frames_per_clip=8)
  config = cav_mae.get_config("tiny")
  config.data.dir, config.data.num_frames, config.data.frame_stride = data, 4, 2
  batch = pipeline.first_examples(config.data, "eval", 4)
  assert batch["frames"].shape == (4, 4, 32, 32, 3) and batch["frames"].dtype == np.uint8
  records = TFRecordSource(dataset_info.shard_paths(data, dataset_info.load(data), "eval"))
  for i in range(4):
    _, raw, where = records[int(batch["record_index"][i])]
    frames = schema.decode_example(raw, where)["frames"]
    np.testing.assert_array_equal(batch["frames"][i], frames[[1, 3, 5, 7]])  # centred
  config.data.all_frames = True
  with pytest.raises(ValueError, match="all_frames=True .* excludes data.num_frames=4"):
    pipeline.first_examples(config.data, "eval", 4)


def test_tubelets_round_trip_and_one_frame_is_patchify_image():
  x = jax.random.normal(jax.random.key(0), (2, 8, 32, 24, 3))
  patches = losses.patchify_clip(x, 2, 8)
  assert patches.shape == (2, 4 * 4 * 3, 2 * 8 * 8 * 3)
  np.testing.assert_array_equal(losses.unpatchify_clip(patches, 2, 8, (4, 4, 3)), x)
  # Token (t, h, w) holds frames 2t..2t+1, rows 8h.., columns 8w.., values (time, row, col, c).
  t, h, w = 1, 2, 1
  want = np.asarray(x[0, 2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8]).reshape(-1)
  np.testing.assert_array_equal(patches[0, (t * 4 + h) * 3 + w], want)
  np.testing.assert_array_equal(losses.patchify_clip(x[:, :1], 1, 8),
                                losses.patchify_image(x[:, 0], 8))


def _sincos_3d_reference(dim, t_size, h_size, w_size):
  """MAE-ST's get_3d_sincos_pos_embed, written out in NumPy."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  spatial_dim, temporal_dim = dim // 4 * 3, dim // 4
  grid_w, grid_h = np.meshgrid(np.arange(w_size, dtype=float), np.arange(h_size, dtype=float))
  spatial = np.concatenate([one_d(spatial_dim // 2, grid_w), one_d(spatial_dim // 2, grid_h)], 1)
  temporal = one_d(temporal_dim, np.arange(t_size, dtype=float))
  out = np.concatenate([np.repeat(temporal[:, None], h_size * w_size, 1),
                        np.repeat(spatial[None], t_size, 0)], axis=-1)
  return out.reshape(-1, dim)


def test_3d_position_embeddings_match_the_reference():
  for dim, grid in ((64, (4, 4, 4)), (768, (8, 14, 14)), (96, (2, 3, 5))):
    np.testing.assert_allclose(sincos_3d(dim, *grid), _sincos_3d_reference(dim, *grid),
                               atol=1e-6)
  # The spatial part of each time slot is the 2-D embedding at 3D/4 channels.
  np.testing.assert_array_equal(sincos_3d(64, 4, 3, 5)[2 * 15:3 * 15, 16:], sincos_2d(48, 3, 5))
  with pytest.raises(ValueError, match="embed_dim % 16"):
    sincos_3d(40, 2, 2, 2)


def test_tube_masks_are_the_same_in_every_time_slot():
  keys = masking.example_keys(jax.random.key(0), 16)
  mask = masking.make_mask(keys, 8 * 196, 0.9, "tube", grid=(8, 196))
  per_slot = np.asarray(mask.mask).reshape(16, 8, 196)
  assert (per_slot == per_slot[:, :1]).all()
  # VideoMAE: int(0.9 * 196) = 176 masked per slot, 20 visible; 160 over the clip.
  assert mask.ids_keep.shape == (16, 160) and (per_slot[:, 0].sum(1) == 176).all()
  np.testing.assert_array_equal(np.sort(mask.ids_keep, 1),
                                np.sort(np.nonzero(1 - np.asarray(mask.mask))[1].reshape(16, -1), 1))
  assert len({tuple(np.nonzero(1 - per_slot[i, 0])[0]) for i in range(16)}) == 16  # per example
  with pytest.raises(ValueError, match="needs grid=\\(time slots, tokens per slot\\)"):
    masking.make_mask(keys, 100, 0.9, "tube", grid=(8, 196))


def test_the_tubelet_target_matches_numpy():
  x = np.random.default_rng(0).normal(2.0, 3.0, (2, 5, 2 * 4 * 4 * 3)).astype(np.float32)
  pixels = x.reshape(2, 5, 32, 3)
  want = (pixels - pixels.mean(2, keepdims=True)) / (pixels.std(2, ddof=1, keepdims=True) + 1e-6)
  got = losses.tubelet_target(jnp.asarray(x))
  np.testing.assert_allclose(got, want.reshape(x.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.from_tubelet_target(got, jnp.asarray(x)), x, rtol=1e-5,
                             atol=1e-5)


def _fixed_batch(config, batch=4):
  rng = np.random.default_rng(0)
  model = METHODS[config.method](config).model
  return {"audio": jnp.asarray(rng.standard_normal((batch, model.audio_frames,
                                                    model.mel_bins)), jnp.float32),
          "frames": jnp.asarray(rng.integers(0, 256, (batch, *model.frames_shape)), jnp.uint8),
          "valid": jnp.ones((batch,), bool)}


def test_the_one_frame_model_is_unchanged():
  # The loss, its terms and the gradient norm on a fixed batch, recorded before clips existed.
  with open(os.path.join(HERE, "golden", "cav_mae_tiny_fixed_batch.json")) as f:
    golden = json.load(f)
  config = cav_mae.get_config("tiny")
  method = METHODS[config.method](config)
  batch = _fixed_batch(config)
  params = nn.meta.unbox(method.init(jax.random.key(0), batch)["params"])
  keys = masking.example_keys(jax.random.key(1), 4)
  (loss, metrics), grads = jax.value_and_grad(method.loss_fn, has_aux=True)(params, batch, keys)
  got = {"loss": loss, **{k: metrics[k] for k in ("loss_mae_a", "loss_mae_v", "loss_contrastive")},
         "grad_norm": jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))),
         "num_params": sum(x.size for x in jax.tree.leaves(params))}
  for key, want in golden.items():
    np.testing.assert_allclose(float(got[key]), want, rtol=1e-6, err_msg=key)


def test_a_clip_model_trains_on_tubelets_with_tube_masks():
  config = cav_mae.override(cav_mae.get_config("tiny"), {
      "model.num_frames": 4, "model.tubelet_size": 2, "data.num_frames": 4,
      "masking.mode_v": "tube", "masking.ratio_v": 0.75, "loss.video_target": "tubelet"})
  method = METHODS[config.method](config)
  assert method.model.video_grid == (2, 4, 4)
  batch = _fixed_batch(config)
  params = nn.meta.unbox(method.init(jax.random.key(0), batch)["params"])
  assert params["patch_embed_v"]["kernel"].shape == (2 * 8 * 8 * 3, 64)
  keys = masking.example_keys(jax.random.key(1), 4)
  _, mask_v = method.masks(keys)
  assert mask_v.ids_keep.shape == (4, 2 * 4)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(method.loss_fn, has_aux=True))(
      params, batch, keys)
  assert np.isfinite(float(loss)) and float(metrics["loss_mae_v"]) > 0
  # The video loss is the tubelet-normalised MSE of the masked tubelets, in NumPy.
  mask_a, mask_v = method.masks(keys)
  frames = normalize_image(batch["frames"])
  pred = np.asarray(method.model.apply({"params": params}, batch["audio"], frames, mask_a,
                                       mask_v)["pred_v"])
  pixels = np.asarray(losses.patchify_clip(frames, 2, 8)).reshape(4, 32, 128, 3)
  target = ((pixels - pixels.mean(2, keepdims=True))
            / (pixels.std(2, ddof=1, keepdims=True) + 1e-6)).reshape(4, 32, -1)
  removed = np.asarray(mask_v.mask)
  want = (((pred - target) ** 2).mean(-1) * removed).sum() / removed.sum()
  np.testing.assert_allclose(float(metrics["loss_mae_v"]), want, rtol=1e-5)
  assert float(jnp.abs(grads["patch_embed_v"]["kernel"]).sum()) > 0


def _clip_run(data, workdir, total_steps, mesh):
  config = cav_mae.override(cav_mae.get_config("tiny_video"), {
      "data.dir": data, "data.batch_size": 8, "total_steps": total_steps, "log_every_steps": 1,
      "image_every_steps": 1000, "checkpoint_every_steps": 1000, "mesh": mesh})
  train.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_a_clip_model_is_mesh_invariant_and_resumes_exactly(tmp_path):
  data = str(tmp_path / "data")
  make_synthetic.make_synthetic(data, num_train=32, num_eval=8, num_shards=2, frames_per_clip=8,
                                frame_size=64)
  one = _clip_run(data, str(tmp_path / "1"), 4, {"data": 1, "fsdp": 1, "tensor": 1})
  mixed = _clip_run(data, str(tmp_path / "222"), 4, {"data": 2, "fsdp": 2, "tensor": 2})
  assert len(one) == 4 and one[0] != one[-1]
  np.testing.assert_allclose(mixed, one, rtol=1e-5)
  # Stopped after 2 steps and resumed: the same losses as the run straight to 4, bit for bit.
  split = str(tmp_path / "split")
  _clip_run(data, split, 2, {"data": 1, "fsdp": 1, "tensor": 1})
  assert _clip_run(data, split, 4, {"data": 1, "fsdp": 1, "tensor": 1}) == one
