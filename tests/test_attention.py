"""vit.dot_product_attention: the CPU path (pre-scaled q, query blocks under jax.checkpoint)
computes what jax.nn.dot_product_attention does, and other platforms get jax.nn's own."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avmae import aot, sharding
from avmae.models import vit


def _qkv(batch, tokens, heads, head_dim, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), dtype)
          for _ in range(4)]


def _value_and_grads(attention, q, k, v, cotangent):
  return jax.jit(jax.value_and_grad(
      lambda *a: jnp.vdot(attention(*a).astype(jnp.float32), cotangent.astype(jnp.float32)),
      argnums=(0, 1, 2)))(q, k, v)


# 37 tokens: the blocks do not divide it (padded queries); 2**14 bytes force 9 blocks.
@pytest.mark.parametrize("block_bytes", [2**40, 2**14])
def test_cpu_attention_equals_jax_nn(monkeypatch, block_bytes):
  monkeypatch.setattr(vit, "CPU_SCORE_BLOCK_BYTES", block_bytes)
  q, k, v, cotangent = _qkv(3, 37, 4, 16)
  ref_out = jax.nn.dot_product_attention(q, k, v)
  out = jax.jit(lambda *a: vit.cpu_attention(*a))(q, k, v)
  np.testing.assert_allclose(out, ref_out, rtol=2e-6, atol=2e-6)
  cpu = lambda *a: vit.cpu_attention(*a)  # a new function: traced with this block size
  (ref_value, ref_grads), (value, grads) = (
      _value_and_grads(f, q, k, v, cotangent) for f in (jax.nn.dot_product_attention, cpu))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  program = jax.jit(cpu).lower(q, k, v).compile().as_text()
  assert ("while" in program) == (block_bytes < 2**20)


def test_cpu_attention_in_bfloat16_stays_close():
  q, k, v, _ = _qkv(2, 40, 2, 32, jnp.bfloat16)
  ref = jax.nn.dot_product_attention(q, k, v).astype(np.float32)
  got = vit.cpu_attention(q, k, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), ref, atol=3e-2)


def test_the_platform_picks_the_attention(monkeypatch):
  """Compiled for this CPU the attention loops over query blocks; compiled for a TPU
  (compile-only devices, libtpu) it is jax.nn.dot_product_attention: no loop."""
  monkeypatch.setattr(vit, "CPU_SCORE_BLOCK_BYTES", 2**12)
  q, _, _, _ = _qkv(4, 32, 2, 8)  # an example per chip of the v5e-4
  attention = lambda *a: vit.dot_product_attention(*a)
  assert "while" in jax.jit(attention).lower(q, q, q).compile().as_text()
  mesh = sharding.make_mesh({"data": -1}, aot.topology_devices(aot.parse_topology("v5e-4"), 1))
  spec = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  tpu = jax.jit(attention).lower(spec, spec, spec).compile().as_text()
  reference = jax.jit(jax.nn.dot_product_attention).lower(spec, spec, spec).compile().as_text()
  assert "while" not in tpu and "while" not in reference
  fusions = lambda text: sorted(re.findall(r"= \S+ (fusion|convolution|dot)\(", text))
  assert fusions(tpu) == fusions(reference)


def test_the_gpu_branch_traces_and_falls_back_where_cudnn_cannot(monkeypatch):
  """Here no cuDNN answers: gpu_attention is jax.nn's XLA path; a process that reports a GPU
  traces the cuDNN branch too, and the step lowered for this CPU still runs cpu_attention."""
  q, k, v, _ = _qkv(2, 24, 2, 16, jnp.bfloat16)
  ref = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_array_equal(jax.jit(vit.gpu_attention)(q, k, v), ref)
  with pytest.raises(RuntimeError, match="cuDNN"):  # what the fallback catches
    jax.jit(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn"))(q, k, v)
  traced = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(vit, "gpu_attention", lambda *a: traced.append(1) or ref)
  out = jax.jit(lambda *a: vit.dot_product_attention(*a))(q, k, v)
  assert traced == [1]
  np.testing.assert_allclose(out.astype(np.float32), vit.cpu_attention(q, k, v).astype(
      np.float32), atol=1e-2)
