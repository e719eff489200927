"""Linear probe heads: vmapped sweep == separate runs, separable data is learned, BN uses train
statistics, layer-weighted features, unknown heads."""

import time

import jax
import numpy as np
import pytest

from avmae import probe_heads

LRS, WDS = (3e-3, 3e-2), (0.0, 0.05)


def blobs(n: int = 400, d: int = 16, c: int = 5, seed: int = 0, shift: float = 0.0):
  """Well-separated Gaussian blobs: features [n, d] and one-hot labels [n, c]."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(0.0, 3.0, (c, d))
  labels = rng.integers(0, c, n)
  x = centres[labels] + rng.normal(0.0, 1.0, (n, d)) + shift
  return x.astype(np.float32), np.eye(c, dtype=np.float32)[labels]


def multilabel_data(n: int = 400, d: int = 16, c: int = 5, seed: int = 0):
  """Random multi-hot labels, features a linear image of them plus noise."""
  rng = np.random.default_rng(seed)
  y = (rng.random((n, c)) < 0.4).astype(np.float32)
  mix = np.random.default_rng(98).normal(0.0, 3.0, (c, d))
  return (y @ mix + rng.normal(0.0, 0.5, (n, d))).astype(np.float32), y


DATA = {False: blobs, True: multilabel_data}


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("head", sorted(probe_heads.HEADS))
def test_sweep_equals_separate_runs(head, multilabel):
  x, y = DATA[multilabel](n=96, d=8, c=3)
  kw = dict(head=head, multilabel=multilabel, steps=15, batch_size=32, seed=3)
  sweep = probe_heads.train_sweep(x, y, lrs=LRS, weight_decays=WDS, **kw)
  scores = probe_heads.predict(sweep, x, head)
  grid = [(lr, wd) for lr in LRS for wd in WDS]  # lr major, as documented
  assert scores.shape == (len(grid), 96, 3)
  for g, (lr, wd) in enumerate(grid):
    single = probe_heads.train_single(x, y, lr=lr, weight_decay=wd, **kw)
    for k in sweep:
      np.testing.assert_allclose(sweep[k][g], single[k][0], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(scores[g], probe_heads.predict(single, x, head)[0],
                               rtol=1e-5, atol=1e-6)
  # The grid points really differ: lr and wd reach the optimizer.
  assert not np.allclose(sweep["w"][0], sweep["w"][1])
  assert not np.allclose(sweep["w"][0], sweep["w"][2])


def test_only_weights_decayed():
  """All-zero features: `w` and LayerNorm's scale get no gradient, so only decay moves them."""
  x, y = np.zeros((32, 4), np.float32), np.eye(2, dtype=np.float32)[np.arange(32) % 2]
  kw = dict(multilabel=False, lrs=[0.1], weight_decays=[0.0, 5.0], steps=5, batch_size=8, seed=0)
  linear = probe_heads.train_sweep(x, y, head="linear", **kw)
  lr_t = 0.1 * 0.5 * (1 + np.cos(np.pi * np.arange(5) / 5))  # the cosine schedule
  decay = np.prod(1 - lr_t * 5.0)  # AdamW: p <- p - lr_t * (adam(g = 0) = 0 + wd * p)
  np.testing.assert_allclose(linear["w"][1], linear["w"][0] * decay, rtol=1e-5)
  np.testing.assert_allclose(linear["w"][0], probe_heads.HEADS["linear"].init(
      jax.random.split(jax.random.PRNGKey(0))[0], x, 2)["w"], rtol=1e-6)
  np.testing.assert_array_equal(linear["b"][1], linear["b"][0])  # trained, not decayed
  assert np.abs(linear["b"][0]).max() > 0.01
  ln = probe_heads.train_sweep(x, y, head="ln_linear", **kw)
  np.testing.assert_array_equal(ln["scale"], np.ones((2, 4)))  # not decayed


@pytest.mark.parametrize("head", sorted(probe_heads.HEADS))
def test_separable_single_label(head):
  x, y = blobs()
  params = probe_heads.train_sweep(x, y, head=head, multilabel=False, lrs=(1e-3, 1e-2, 1e-1),
                                   weight_decays=(0.0, 1e-2), steps=100, batch_size=64, seed=0)
  scores = np.asarray(probe_heads.predict(params, x, head))
  acc = (scores.argmax(-1) == y.argmax(-1)).mean(-1)
  best = probe_heads.select_best(acc)
  assert acc[best] > 0.95, acc
  ridge = np.asarray(probe_heads.ridge_probe(x, y, x, 1.0))
  assert (ridge.argmax(-1) == y.argmax(-1)).mean() > 0.95


def test_separable_multilabel():
  x, y = multilabel_data()
  params = probe_heads.train_sweep(x, y, head="bn_linear", multilabel=True, lrs=(1e-2, 1e-1),
                                   weight_decays=(0.0,), steps=150, batch_size=64, seed=0)
  scores = np.asarray(probe_heads.predict(params, x, "bn_linear"))
  per_class = ((scores > 0) == (y > 0.5)).mean(1)  # [G, C]
  best = probe_heads.select_best(per_class.mean(-1))
  assert per_class[best].min() > 0.95, per_class
  ridge = np.asarray(probe_heads.ridge_probe(x, y, x, 1.0))
  assert ((ridge > 0.5) == (y > 0.5)).mean(0).min() > 0.9


def test_bn_linear_standardises_with_train_statistics():
  x, y = blobs(n=200)
  test_x, _ = blobs(n=50, seed=1, shift=4.0)  # shifted: its own statistics would differ
  params = probe_heads.train_sweep(x, y, head="bn_linear", multilabel=False, lrs=(1e-2,),
                                   weight_decays=(0.0, 1e-2), steps=10, batch_size=32, seed=0)
  for g in range(2):
    np.testing.assert_allclose(params["mean"][g], x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(params["var"][g], x.var(0), rtol=1e-5)
  w, b = np.asarray(params["w"][0]), np.asarray(params["b"][0])
  scores = np.asarray(probe_heads.predict(params, test_x, "bn_linear"))[0]
  expected = (test_x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6) @ w + b
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
  own = (test_x - test_x.mean(0)) / np.sqrt(test_x.var(0) + 1e-6) @ w + b
  assert not np.allclose(scores, own, atol=1e-2)


def test_layer_weighted_features():
  """[N, L, D] stacks: a softmax weight per layer is learned; the informative layer wins."""
  x, y = blobs(n=300)
  noise = np.random.default_rng(5).normal(0.0, 3.0, (3,) + x.shape).astype(np.float32)
  stack = np.stack([noise[0], x, noise[1], noise[2]], axis=1)  # layer 1 carries the labels
  for head in sorted(probe_heads.HEADS):
    params = probe_heads.train_sweep(stack, y, head=head, multilabel=False, lrs=(3e-2,),
                                     weight_decays=(0.0,), steps=100, batch_size=64, seed=0)
    assert params["layer_logits"].shape == (1, 4)
    assert int(np.argmax(params["layer_logits"][0])) == 1, head
    acc = (np.asarray(probe_heads.predict(params, stack, head))[0].argmax(-1)
           == y.argmax(-1)).mean()
    assert acc > 0.9, (head, acc)


def test_select_best():
  assert probe_heads.select_best([0.1, 0.5, 0.5, 0.2]) == 1  # ties: the first
  assert probe_heads.select_best(np.array([np.nan, 0.3, 0.1])) == 1  # a diverged point loses


def test_unknown_head():
  x, y = blobs(n=8)
  with pytest.raises(ValueError, match="bn_linear.*linear.*ln_linear"):
    probe_heads.train_sweep(x, y, head="mlp", multilabel=False, lrs=(1e-3,),
                            weight_decays=(0.0,), steps=1, batch_size=4, seed=0)
  with pytest.raises(ValueError, match="valid heads"):
    probe_heads.predict({}, x, "mlp")


def test_sweep_time_vs_single_runs():
  """Informational only (timing asserts are not used in this project): G=8 sweep vs 8 runs."""
  x, y = blobs(n=1024, d=64, c=10)
  lrs, wds = (1e-3, 3e-3, 1e-2, 3e-2), (0.0, 1e-2)
  kw = dict(head="bn_linear", multilabel=False, steps=50, batch_size=128, seed=0)
  run = lambda f: jax.block_until_ready(f())
  sweep = lambda: probe_heads.train_sweep(x, y, lrs=lrs, weight_decays=wds, **kw)
  singles = lambda: [probe_heads.train_single(x, y, lr=lr, weight_decay=wd, **kw)
                     for lr in lrs for wd in wds]
  run(sweep), run(lambda: singles()[0])  # compile both programs outside the timing
  start = time.perf_counter()
  params = run(sweep)
  t_sweep = time.perf_counter() - start
  start = time.perf_counter()
  run(singles)
  t_singles = time.perf_counter() - start
  print(f"\n[probe_heads] G=8 sweep {t_sweep:.3f} s, 8 single runs {t_singles:.3f} s "
        f"({t_singles / t_sweep:.1f}x)")
  assert params["w"].shape == (8, 64, 10)
