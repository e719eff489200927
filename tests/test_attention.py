"""vit.dot_product_attention: the CPU path (pre-scaled q, heads-major, its own backward pass)
computes what jax.nn.dot_product_attention does, and other platforms get jax.nn's own;
vit.project: the attention projections as plain matmuls on a CPU, the einsum elsewhere;
vit.dense: jnp.dot elsewhere, on a CPU with its kernel gradient where YNNPACK takes it."""

import math
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


def test_cpu_attention_equals_jax_nn():
  q, k, v, cotangent = _qkv(3, 37, 4, 16)
  ref_out = jax.nn.dot_product_attention(q, k, v)
  out = jax.jit(vit.cpu_attention)(q, k, v)
  np.testing.assert_allclose(out, ref_out, rtol=2e-6, atol=2e-6)
  (ref_value, ref_grads), (value, grads) = (
      _value_and_grads(f, q, k, v, cotangent) for f in (jax.nn.dot_product_attention,
                                                        vit.cpu_attention))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_cpu_attention_saves_no_probabilities_for_the_backward_pass():
  """Its residuals are q, k, v, the output and a log-sum-exp per query: nothing of
  [T, T] (autodiff of jax.nn's softmax saves the probabilities)."""
  q, k, v, _ = _qkv(2, 50, 3, 8)
  saved = lambda f: [x.size for x in jax.tree.leaves(jax.vjp(f, q, k, v)[1])]
  assert max(saved(vit.cpu_attention)) == q.size
  assert max(saved(jax.nn.dot_product_attention)) == 2 * 3 * 50 * 50


def test_cpu_attention_in_bfloat16_stays_close():
  q, k, v, _ = _qkv(2, 40, 2, 32, jnp.bfloat16)
  ref = jax.nn.dot_product_attention(q, k, v).astype(np.float32)
  got = vit.cpu_attention(q, k, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), ref, atol=3e-2)


def test_the_platform_picks_the_attention():
  """Compiled for this CPU, attention and its gradient are cpu_attention's; compiled for a
  TPU (compile-only devices, libtpu) it is jax.nn.dot_product_attention."""
  q, k, v, cotangent = _qkv(4, 32, 2, 8)  # an example per chip of the v5e-4
  fusions = lambda text: sorted(re.findall(r"= (\S+) (fusion|convolution|dot)\(", text))
  grads = lambda f: fusions(jax.jit(jax.grad(
      lambda *a: jnp.vdot(f(*a), cotangent), argnums=(0, 1, 2))).lower(q, k, v).compile().as_text())
  cpu = grads(vit.dot_product_attention)
  assert cpu == grads(vit.cpu_attention) and cpu != grads(jax.nn.dot_product_attention)
  mesh = sharding.make_mesh({"data": -1}, aot.topology_devices(aot.parse_topology("v5e-4"), 1))
  spec = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  attention = lambda *a: vit.dot_product_attention(*a)
  tpu = jax.jit(attention).lower(spec, spec, spec).compile().as_text()
  reference = jax.jit(jax.nn.dot_product_attention).lower(spec, spec, spec).compile().as_text()
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


def _tpu_ops(functions: dict, *args: jax.Array) -> dict[str, list]:
  """Each jitted function's instructions, compiled for a compile-only v5e-4."""
  mesh = sharding.make_mesh({"data": -1}, aot.topology_devices(aot.parse_topology("v5e-4"), 1))
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())) for a in args]
  return {name: sorted(re.findall(r"= (\S+) (\w+)\(", f.lower(*specs).compile().as_text()))
          for name, f in functions.items()}


@pytest.mark.parametrize("spec, x_shape, kernel_shape", [
    ("...td,dkhc->k...thc", (4, 50, 96), (96, 3, 4, 24)),  # the fused qkv projection
    ("...thc,hcd->...td", (2, 4, 50, 4, 24), (4, 24, 96)),   # the output projection
])
def test_project_is_the_einsum_without_transposes_on_a_cpu(spec, x_shape, kernel_shape):
  """vit.project equals its einsum, value and gradients. Compiled for this CPU, its gradient
  program neither transposes nor copies the kernel or the kernel's gradient (the einsum's
  does); compiled for a TPU, it is the einsum's own program."""
  rng = np.random.default_rng(0)
  x, kernel = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, kernel_shape))
  cotangent = jnp.asarray(rng.standard_normal(jnp.einsum(spec, x, kernel).shape), jnp.float32)
  loss = lambda f: lambda a, b: jnp.vdot(f(a, b), cotangent)
  grads = {name: jax.jit(jax.value_and_grad(loss(f), argnums=(0, 1)))
           for name, f in (("einsum", lambda a, b: jnp.einsum(spec, a, b)),
                           ("project", lambda a, b: vit.project(a, b, spec)))}
  (ref_value, ref_grads), (value, got) = grads["einsum"](x, kernel), grads["project"](x, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(got, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
  def kernel_moves(text):  # transposes and copies of the kernel's size: it or its gradient
    shapes = re.findall(r"= f32\[([\d,]+)\]\S* (?:transpose|copy)\(", text)
    return sum(math.prod(map(int, s.split(","))) == kernel.size for s in shapes)
  cpu = {name: f.lower(x, kernel).compile().as_text() for name, f in grads.items()}
  assert kernel_moves(cpu["project"]) == 0 < kernel_moves(cpu["einsum"])
  tpu = _tpu_ops(grads, x, kernel)
  assert tpu["project"] == tpu["einsum"]


def _entry_dots(text: str) -> list[str]:
  """The dots of a compiled program's entry computation: XLA:CPU's own (Eigen) dots; YNNPACK's
  sit inside fusions."""
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  return re.findall(r"^\s+(?:ROOT )?%\S+ = \S+ dot\(.*$", entry, re.M)


@pytest.mark.parametrize("x_shape, kernel_shape", [
    ((4, 50, 96), (96, 384)),   # fewer inputs than outputs (fc1, qkv): the YNNPACK form
    ((4, 50, 96), (96, 96)),    # as many (the output projection): the YNNPACK form
    ((4, 50, 384), (384, 96)),  # more (fc2): autodiff's form
])
def test_dense_is_jnp_dot_with_ynnpack_kernel_gradients_on_a_cpu(x_shape, kernel_shape):
  """vit.dense equals jnp.dot, value and gradients. Compiled for this CPU, its kernel gradient
  is a YNNPACK dot where the input has no more features than the output (jnp.dot's is XLA's
  own dot), and as jnp.dot's otherwise; compiled for a TPU, it is jnp.dot's own program."""
  rng = np.random.default_rng(0)
  x, kernel = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, kernel_shape))
  cotangent = jnp.asarray(rng.standard_normal((*x_shape[:-1], kernel_shape[1])), jnp.float32)
  loss = lambda f: lambda a, b: jnp.vdot(f(a, b), cotangent)
  grads = {name: jax.jit(jax.value_and_grad(loss(f), argnums=(0, 1)))
           for name, f in (("dot", jnp.dot), ("dense", vit.dense))}
  (ref_value, ref_grads), (value, got) = grads["dot"](x, kernel), grads["dense"](x, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(got, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
  cpu = {name: _entry_dots(f.lower(x, kernel).compile().as_text()) for name, f in grads.items()}
  kernel_grad = lambda dots: [d for d in dots if d.split(" = ")[1].startswith(
      f"f32[{kernel_shape[0]},{kernel_shape[1]}]")]
  assert len(kernel_grad(cpu["dot"])) == 1
  assert len(kernel_grad(cpu["dense"])) == (x_shape[-1] > kernel_shape[1])
  tpu = _tpu_ops(grads, x, kernel)
  assert tpu["dense"] == tpu["dot"]
