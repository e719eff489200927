"""Patchify and losses against NumPy references written to mirror the official PyTorch code."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from avmae import losses, sharding


def ref_patchify_nchw(imgs: np.ndarray, p: int) -> np.ndarray:
  """Official patchify: (N, C, H, W) -> reshape nchpwq -> einsum nhwpqc -> (N, h*w, p*p*C)."""
  n, c, hh, ww = imgs.shape
  h, w = hh // p, ww // p
  x = np.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, h, p, w, p))
  return x.reshape(n, h * w, p * p * c)


def ref_reconstruction(pred, target, mask, norm_pix, valid=None):
  pred, target, mask = (np.asarray(a, np.float64) for a in (pred, target, mask))
  if norm_pix:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, ddof=1, keepdims=True) + 1e-6)
  loss = ((pred - target) ** 2).mean(-1)
  if valid is not None:
    loss, mask = loss[valid], mask[valid]
  return (loss * mask).sum() / mask.sum()


def ref_nce(a, v, temperature=0.05, bidirectional=False):
  """Official forward_contrastive in float64: per-positive nll and hit, [B] each."""
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  v = v / np.linalg.norm(v, axis=-1, keepdims=True)
  total = a @ v.T / temperature

  def one(t):  # log_softmax over dim 0, positives on the diagonal
    logp = t - t.max(0) - np.log(np.exp(t - t.max(0)).sum(0))
    return -np.diag(logp), (t.argmax(0) == np.arange(len(t))).astype(np.float64)

  nll, hit = one(total)
  if bidirectional:
    nll2, hit2 = one(total.T)
    nll, hit = (nll + nll2) / 2, (hit + hit2) / 2
  return nll, hit


def ref_contrastive(a, v, bidirectional=False, group_size=None, valid=None):
  """Per-group official losses on the valid examples only, averaged over all positives."""
  a, v = np.asarray(a, np.float64), np.asarray(v, np.float64)
  b = len(a)
  g = group_size or b
  valid = np.ones(b, bool) if valid is None else np.asarray(valid)
  keep = [np.arange(s, s + g)[valid[s:s + g]] for s in range(0, b, g)]
  parts = [ref_nce(a[k], v[k], bidirectional=bidirectional) for k in keep if len(k)]
  nll, hit = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  return nll.mean(), hit.mean()


def test_patchify_image_matches_official_nchw():
  x = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)
  got = np.asarray(losses.patchify_image(jnp.asarray(x), 16))
  np.testing.assert_array_equal(got, ref_patchify_nchw(x.transpose(0, 3, 1, 2), 16))
  assert got.shape == (2, 6, 768)
  back = losses.unpatchify_image(jnp.asarray(got), 16, grid=(2, 3))
  np.testing.assert_array_equal(back, x)
  sq = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(losses.unpatchify_image(losses.patchify_image(sq, 16), 16), sq)


def test_patchify_audio_is_frequency_major_as_official():
  audio = np.arange(1024 * 128, dtype=np.float32).reshape(1, 1024, 128)  # [B, T, F]
  got = np.asarray(losses.patchify_audio(jnp.asarray(audio), 16))
  assert got.shape == (1, 512, 256)
  # Official: unsqueeze(1), transpose(2, 3) -> [B, 1, F, T], then patchify with c = 1.
  np.testing.assert_array_equal(got, ref_patchify_nchw(audio[:, None].transpose(0, 1, 3, 2), 16))
  # Token 1 = freq block 0, time block 1; values ordered (freq offset, time offset).
  np.testing.assert_array_equal(got[0, 1], audio[0, 16:32, 0:16].T.reshape(-1))
  np.testing.assert_array_equal(got[0, 64], audio[0, 0:16, 16:32].T.reshape(-1))
  np.testing.assert_array_equal(losses.unpatchify_audio(jnp.asarray(got), 16, 128), audio)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_loss_matches_reference(norm_pix):
  rng = np.random.default_rng(2)
  pred, target = rng.normal(size=(2, 4, 10, 12)).astype(np.float32) * [[[[1]]], [[[3]]]]
  target = target + 2.0
  mask = (rng.random((4, 10)) < 0.7).astype(np.float32)
  valid = np.array([True, False, True, True])
  fn = jax.jit(losses.reconstruction_loss, static_argnames="norm_pix")
  got = fn(pred, target, mask, norm_pix=norm_pix)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_reconstruction(pred, target, mask, norm_pix), rtol=1e-5)
  got_v = fn(pred, target, mask, norm_pix=norm_pix, valid=jnp.asarray(valid))
  np.testing.assert_allclose(got_v, ref_reconstruction(pred, target, mask, norm_pix, valid),
                             rtol=1e-5)
  none = fn(pred, target, mask, norm_pix=norm_pix, valid=jnp.zeros(4, bool))
  assert float(none) == 0.0


def test_reconstruction_loss_bfloat16_inputs_compute_in_float32():
  rng = np.random.default_rng(3)
  pred, target = rng.normal(size=(2, 4, 16, 256)).astype(np.float32)
  mask = (rng.random((4, 16)) < 0.75).astype(np.float32)
  fn = jax.jit(losses.reconstruction_loss)
  f32 = fn(pred, target, mask)
  bf16 = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (pred, target, mask)))
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, rtol=1e-2)


CONTRASTIVE_CASES = [
    dict(), dict(bidirectional=True), dict(group_size=4), dict(group_size=4, bidirectional=True),
    dict(valid=True), dict(valid=True, group_size=4, bidirectional=True),
]


@pytest.mark.parametrize("case", CONTRASTIVE_CASES, ids=str)
def test_contrastive_loss_matches_reference(case):
  rng = np.random.default_rng(4)
  a, v = rng.normal(size=(2, 16, 8)).astype(np.float32)
  v = v + 0.8 * a  # partly aligned, so accuracy is neither 0 nor 1
  valid = rng.random(16) < 0.7 if case.get("valid") else None
  kwargs = {k: val for k, val in case.items() if k != "valid"}
  fn = jax.jit(functools.partial(losses.contrastive_loss, **kwargs))
  loss, acc = fn(a, v, valid=None if valid is None else jnp.asarray(valid))
  want_loss, want_acc = ref_contrastive(a, v, valid=valid, **kwargs)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, want_acc, rtol=1e-6)
  assert loss.dtype == acc.dtype == jnp.float32


def test_contrastive_accuracy_is_one_when_aligned():
  a = np.random.default_rng(5).normal(size=(12, 32)).astype(np.float32)
  for bidirectional in (False, True):
    fn = jax.jit(functools.partial(losses.contrastive_loss, bidirectional=bidirectional))
    _, acc = fn(a, 3.0 * a)
    assert float(acc) == 1.0


def test_contrastive_group_size_must_divide_batch():
  a = np.ones((10, 4), np.float32)
  with pytest.raises(ValueError, match=r"10.*4"):
    losses.contrastive_loss(a, a, group_size=4)


def test_contrastive_loss_sharded_equals_unsharded():
  # Negatives come from the global batch whatever the sharding of the inputs.
  rng = np.random.default_rng(6)
  a, v = rng.normal(size=(2, 32, 16)).astype(np.float32)
  mesh = sharding.make_mesh({"data": 8})
  spec = NamedSharding(mesh, P("data"))
  a_s, v_s = jax.device_put(a, spec), jax.device_put(v, spec)
  for bidirectional in (False, True):
    fn = jax.jit(functools.partial(losses.contrastive_loss, bidirectional=bidirectional))
    got, want = fn(a_s, v_s), fn(a, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    np.testing.assert_allclose(want[0], ref_contrastive(a, v, bidirectional)[0], rtol=1e-5)
