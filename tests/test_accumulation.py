"""Gradient accumulation: microbatches inside the jitted step equal one large step (the
reconstruction terms exactly; the contrastive term with the matching `loss.group_size`), stay
on their data shards, and train end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avmae import aot, masking, sharding, train
from avmae.methods import METHODS
from configs import cav_mae
from test_train import _metrics, synthetic_dir, tiny  # noqa: F401 (a fixture)

BATCH = 16


def _setup(**overrides):
  c = cav_mae.override(cav_mae.get_config("tiny"), {"data.batch_size": BATCH, **overrides})
  method = METHODS[c.method](c)
  batch = method.example_batch(c.data.batch_size)
  batch["audio"] = jax.random.normal(jax.random.key(1), batch["audio"].shape)
  batch["frames"] = jax.random.randint(jax.random.key(2), batch["frames"].shape, 0, 256
                                       ).astype(jnp.uint8)
  params = sharding.strip_logical_names(method.init(jax.random.key(0), batch))["params"]
  keys = masking.example_keys(jax.random.key(3), BATCH)
  return method, params, batch, keys


def _assert_close(got, want, metric_names=None):
  (loss, metrics), grads = got
  (want_loss, want_metrics), want_grads = want
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for k in metric_names or want_metrics:
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # float32 rounding of sums over 4x fewer tokens: with atol 1e-7 the worst element was at
  # 0.75 of the tolerance (einsum projections) and 1.02 (vit.project's matmuls), one of 12,288
  # of the patch-embedding kernel's gradient (1.27e-4 against 1.27e-4 + 1.15e-7). Rounding
  # alone reaches that far: the large grouped step against itself with its groups' order
  # reversed (the same sums, reordered) is at 0.21 (groups of 8) and 0.58 (of 4) of atol 1e-7.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-7),
               grads, want_grads)


@pytest.mark.parametrize("num_micro", [2, 4])
def test_accumulated_reconstruction_equals_the_large_step(num_micro):
  method, params, batch, keys = _setup(**{"loss.contrastive_weight": 0.0})
  step = jax.jit(train.loss_and_grads, static_argnums=(0, 4, 5))
  large = step(method.loss_fn, params, batch, keys, 1, 1)
  # The contrastive metrics (weight 0 here) have fewer negatives per microbatch.
  _assert_close(step(method.loss_fn, params, batch, keys, num_micro, 1), large,
                ("loss", "loss_mae", "loss_mae_a", "loss_mae_v"))
  assert float(large[0][0]) > 0


@pytest.mark.parametrize("num_micro", [2, 4])
def test_accumulated_contrastive_equals_the_large_step_with_group_size(num_micro):
  method, params, batch, keys = _setup(**{"loss.contrastive_weight": 1.0,
                                          "loss.bidirectional": True})
  grouped, *_ = _setup(**{"loss.contrastive_weight": 1.0, "loss.bidirectional": True,
                          "loss.group_size": BATCH // num_micro})
  step = jax.jit(train.loss_and_grads, static_argnums=(0, 4, 5))
  accumulated = step(method.loss_fn, params, batch, keys, num_micro, 1)
  _assert_close(accumulated, step(grouped.loss_fn, params, batch, keys, 1, 1))
  # Fewer negatives: not the whole-batch InfoNCE.
  whole = step(method.loss_fn, params, batch, keys, 1, 1)
  assert abs(float(whole[0][1]["loss_contrastive"])
             - float(accumulated[0][1]["loss_contrastive"])) > 1e-3


def test_microbatches_stay_on_their_data_shard():
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  method, params, batch, keys = _setup()
  put = jax.device_put(batch, sharding.batch_sharding(mesh, ("data",)))
  step = jax.jit(train.loss_and_grads, static_argnums=(0, 4, 5))
  with jax.set_mesh(mesh):
    hlo = step.lower(method.loss_fn, params, put, keys, 2, 8).compile().as_text()
    sharded = step(method.loss_fn, params, put, keys, 2, 8)
  # Only the contrastive term's negatives move (pooled [8, 64] latents, a few KiB); the
  # inputs (512 KiB of audio, 48 KiB of frames) are never gathered or shuffled.
  moved = {k: v["bytes"] for k, v in aot.collectives(hlo).items() if "all-reduce" not in k}
  assert moved and sum(moved.values()) < 16 * 2**10, moved
  # Microbatch i is the i-th half of every shard's 2 rows: rows 0, 2, 4, ... then 1, 3, 5, ...
  ids = train.microbatches(jnp.arange(BATCH), 2, 8)
  np.testing.assert_array_equal(ids, [np.arange(0, BATCH, 2), np.arange(1, BATCH, 2)])
  _assert_close(sharded, step(method.loss_fn, params, batch, keys, 2, 8))


def test_training_with_accumulation_runs_and_checks_the_split(synthetic_dir, tmp_path):
  train.train(tiny(synthetic_dir, **{"optimizer.accumulation_steps": 2}), str(tmp_path / "a"))
  losses = [m["loss"] for m in _metrics(str(tmp_path / "a"))]
  assert len(losses) == 3 and all(np.isfinite(losses))
  with pytest.raises(ValueError, match=r"config.optimizer.accumulation_steps=3: the batch per "
                     r"data shard \(16 / 8\) must split"):
    train.train(tiny(synthetic_dir, **{"optimizer.accumulation_steps": 3}), str(tmp_path / "b"))
  with pytest.raises(ValueError, match=r"config.loss.group_size=16 does not divide the "
                     r"microbatch"):
    train.train(tiny(synthetic_dir, **{"optimizer.accumulation_steps": 2,
                                       "loss.group_size": 16}), str(tmp_path / "c"))
