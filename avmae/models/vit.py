"""Transformer building blocks shared by the models, with logical axis names only.

Parameters are annotated with logical names (`embed`, `mlp`, `heads`, `head_dim`, `patch`,
`norm`); activations with `batch`, `tokens`, `act_embed`, `act_mlp`, `act_heads`. The rules
that map them to mesh axes live in the config (avmae/sharding.py applies them).

Attention is written with `self.param` and its own `dot_product_attention`, not
nn.MultiHeadDotProductAttention, which crashes with logical partitioning under a mesh.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LN_EPS = 1e-5  # PyTorch's LayerNorm default, which the reference models were trained with

xavier = nn.initializers.xavier_uniform


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  return nn.with_logical_constraint(x, names)


def sincos_1d(embed_dim: int, length: int) -> np.ndarray:
  """[length, embed_dim]: [sin, cos] of position * 10000^(-k / (D/2)), as MAE's 1-D part."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos position embedding needs an even embed_dim, got {embed_dim}")
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))
  out = np.outer(np.arange(length, dtype=np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_1d_interleaved(embed_dim: int, length: int) -> np.ndarray:
  """[length, embed_dim]: sin of position * exp(-k ln(1e4) / D) in the even channels, cos in
  the odd ones (k = 0, 2, 4, ...), as scenic's fixed 1-D embedding (AV-MAE)."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos position embedding needs an even embed_dim, got {embed_dim}")
  rate = np.exp(np.arange(0, embed_dim, 2) * -(np.log(10000.0) / embed_dim))
  angle = np.arange(length)[:, None] * rate
  out = np.zeros((length, embed_dim), np.float32)
  out[:, 0::2], out[:, 1::2] = np.sin(angle), np.cos(angle)
  return out


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [grid_h * grid_w, embed_dim], token m = h*W + w.

  As in the MAE/CAV-MAE reference: the first half of the channels encodes the column (w)
  coordinate, the second half the row (h) coordinate; each half is [sin, cos] of
  position * 10000^(-k / (D/4)).
  """
  if embed_dim % 4:
    raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
  by_w = np.tile(sincos_1d(embed_dim // 2, grid_w), (grid_h, 1))
  by_h = np.repeat(sincos_1d(embed_dim // 2, grid_h), grid_w, axis=0)
  return np.concatenate([by_w, by_h], axis=1)


def sincos_3d(embed_dim: int, grid_t: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 3-D sin-cos position embedding [T*H*W, D], token (t*H + h)*W + w, as MAE-ST and
  MAViL's video branch: D/4 channels of the time slot, then 3D/4 of `sincos_2d`."""
  if embed_dim % 16:
    raise ValueError(f"3-D sin-cos position embedding needs embed_dim % 16 == 0, got {embed_dim}")
  temporal = np.repeat(sincos_1d(embed_dim // 4, grid_t), grid_h * grid_w, axis=0)
  spatial = np.tile(sincos_2d(embed_dim // 4 * 3, grid_h, grid_w), (grid_t, 1))
  return np.concatenate([temporal, spatial], axis=1)


class Dense(nn.Module):
  """y = x @ kernel + bias over the last axis, with logical names for kernel and bias."""
  features: int
  kernel_axes: tuple[str | None, str | None]
  dtype: Dtype = jnp.float32
  kernel_init: Any = xavier()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(self.bias_init,
                                                           self.kernel_axes[1:]),
                      (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    return dense(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class LayerNormParams(nn.Module):
  """The scale and bias of one LayerNorm. A Block owns three pairs (shared, audio, video)
  but uses one per call, so parameters are declared here and applied by `layer_norm`."""

  @nn.compact
  def __call__(self, dim: int) -> tuple[jax.Array, jax.Array]:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (dim,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (dim,), jnp.float32)
    return scale, bias


def layer_norm(x: jax.Array, params: tuple[jax.Array, jax.Array], dtype: Dtype,
               eps: float = LN_EPS) -> jax.Array:
  """LayerNorm with float32 statistics, output in `dtype`."""
  scale, bias = params
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(dtype)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v over [B, heads, T, head_dim] for a pre-scaled q; scores in float32."""
  return _attention_forward(q, k, v)[0]


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple]:
  """The output, and for the backward pass q, k, v, the output and each query's log-sum-exp
  of scores (not the [T, T] probabilities). The softmax's sum divides the [T, head_dim]
  output, not the [T, T] probabilities."""
  scores = jnp.einsum("bhqc,bhkc->bhqk", q, k, preferred_element_type=jnp.float32)
  top = scores.max(-1, keepdims=True)
  p = jnp.exp(scores - top)
  total = p.sum(-1, keepdims=True)
  out = jnp.einsum("bhqk,bhkc->bhqc", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = (out / total).astype(v.dtype)
  return out, (q, k, v, out, top + jnp.log(total))


def _attention_backward(residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, ...]:
  """Probabilities recomputed from q, k and the log-sum-exp; softmax's backward from
  rowsum(d_out * out), which equals rowsum(d_p * p) over [T, head_dim] instead of [T, T]."""
  q, k, v, out, lse = residuals
  p = jnp.exp(jnp.einsum("bhqc,bhkc->bhqk", q, k, preferred_element_type=jnp.float32) - lse)
  d_v = jnp.einsum("bhqk,bhqc->bhkc", p.astype(d_out.dtype), d_out)
  d_p = jnp.einsum("bhqc,bhkc->bhqk", d_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  d_scores = (p * (d_p - row)).astype(q.dtype)
  return (jnp.einsum("bhqk,bhkc->bhqc", d_scores, k), jnp.einsum("bhqk,bhqc->bhkc", d_scores, q),
          d_v.astype(v.dtype))


_softmax_attention.defvjp(_attention_forward, _attention_backward)


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The attention of `dot_product_attention` as XLA:CPU runs it fastest.

  - heads-major inside ([B, heads, T, head_dim]): the batched dots need no copies;
  - q is scaled before the product, not the [B, heads, T, T] scores after it (XLA:CPU
    materialises the broadcast scale and reads it back);
  - its own backward pass (`_attention_backward`, exact, as flash attention's without the
    key blocks): it saves the output and each query's log-sum-exp, not the probabilities,
    and fewer passes go over [T, T] arrays than under autodiff of the softmax. Blocks of
    queries (to keep the scores in cache) measured slower with it (docs/speed.md).
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k, v = (x.swapaxes(1, 2) for x in (q * scale, k, v))
  return _softmax_attention(q, k, v).swapaxes(1, 2)


def gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """jax.nn.dot_product_attention's fused cuDNN kernel (flash attention: the [T, T] scores
  never reach HBM) where cuDNN takes the inputs (bfloat16 or float16, head sizes it
  supports); its XLA path otherwise. The choice is made while tracing."""
  try:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  except (RuntimeError, ValueError, NotImplementedError):  # no cuDNN, or inputs it refuses
    return jax.nn.dot_product_attention(q, k, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v over [B, T, heads, head_dim], softmax in float32.

  Chosen by the platform the step is lowered for (an AOT compile for a TPU takes the TPU's):
  `cpu_attention` on a CPU, `gpu_attention` on an NVIDIA GPU, jax.nn.dot_product_attention's
  XLA path elsewhere (jax.nn has no fused TPU kernel). They agree to rounding
  (tests/test_attention.py)."""
  branches = {"cpu": cpu_attention, "default": jax.nn.dot_product_attention}
  # Every branch is traced; the cuDNN one only where this process has a GPU to ask.
  if jax.default_backend() == "gpu":
    branches["cuda"] = gpu_attention
  return jax.lax.platform_dependent(q, k, v, **branches)


@jax.custom_vjp
def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, K] @ b [K, N], with the backward pass of `_matmul_backward`."""
  return a @ b


def _matmul_forward(a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple]:
  return a @ b, (a, b)


def _matmul_backward(residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Autodiff's gradients, the kernel's made a YNNPACK dot where that is cheaper.

  XLA:CPU hands YNNPACK only dots of row-major [M, K] x [K, N] operands; the kernel's
  gradient a^T d_out contracts a's rows, so it runs as XLA's own (Eigen) dot, after a
  transposed copy of d_out. When a has no more columns than d_out, a^T is copied instead (the
  smaller copy; the barrier stops XLA from folding the transpose back into the dot) and the
  dot is YNNPACK's: CAV-MAE base, batch 4, 6.36-6.44 -> 6.14-6.16 s a step (docs/speed.md).
  Otherwise autodiff's form is kept: copying the wider a measured slower."""
  a, b = residuals
  if a.shape[1] <= d_out.shape[1]:
    d_b = jax.lax.optimization_barrier(a.T) @ d_out
  else:
    d_b = a.T @ d_out
  return d_out @ b.T, d_b


_matmul.defvjp(_matmul_forward, _matmul_backward)


def matmul_flat(x: jax.Array, kernel: jax.Array, contracted: int) -> jax.Array:
  """x [..., *kernel.shape[:contracted]] times kernel over those axes, as one row-major
  [M, K] x [K, N] matmul (`_matmul`): x [..., *kernel.shape[contracted:]]."""
  lead, out = x.shape[:x.ndim - contracted], kernel.shape[contracted:]
  k = math.prod(kernel.shape[:contracted])
  flat = _matmul(x.reshape(math.prod(lead), k), kernel.reshape(k, math.prod(out)))
  return flat.reshape(*lead, *out)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., K] @ kernel [K, N]: `matmul_flat` lowered for a CPU, jnp.dot elsewhere."""
  return jax.lax.platform_dependent(x, kernel, cpu=lambda x, k: matmul_flat(x, k, 1),
                                    default=jnp.dot)


def project(x: jax.Array, kernel: jax.Array, spec: str) -> jax.Array:
  """jnp.einsum(spec, x, kernel) for a spec that contracts x's last axes with the kernel's
  first (e.g. "...thc,hcd->...td"). Lowered for a CPU it is `matmul_flat`, its output's axes
  then moved to spec's order: XLA:CPU keeps the kernel and its gradient in their own layout
  there, where for an einsum over the heads axes it transposed both each step and Adam read
  the gradients transposed (CAV-MAE base, batch 4: 6.62 -> 6.44 s a step; docs/speed.md).
  Elsewhere the einsum itself: GSPMD shards its named axes, and a reshape of a
  heads-sharded kernel would gather it."""
  inputs, out = spec.split("->")
  x_axes, kernel_axes = inputs.split(",")
  contracted = len(set(x_axes) & set(kernel_axes))
  flat_axes = x_axes[:len(x_axes) - contracted] + kernel_axes[contracted:]
  flat = lambda x, kernel: jnp.einsum(f"{flat_axes}->{out}", matmul_flat(x, kernel, contracted))
  return jax.lax.platform_dependent(x, kernel, cpu=flat,
                                    default=lambda x, kernel: jnp.einsum(spec, x, kernel))


class Attention(nn.Module):
  """Multi-head self-attention; fused qkv kernel [embed, 3, heads, head_dim]."""
  num_heads: int
  dtype: Dtype = jnp.float32
  # Xavier over the fused [embed, 3 * embed] matrix (timm, CAV-MAE), or over each of q, k
  # and v alone (flax's attention, scenic).
  fused_qkv_init: bool = True

  def qkv(self, x: jax.Array) -> jax.Array:
    """[..., T, embed] -> [3, ..., T, heads, head_dim] (q, k, v). Call it from a compact
    method (it declares the parameters)."""
    dim = x.shape[-1]
    head_dim = dim // self.num_heads
    qkv_axes = ("embed", None, "heads", "head_dim")
    qkv_init = (xavier(in_axis=0, out_axis=(1, 2, 3)) if self.fused_qkv_init
                else xavier(in_axis=0, out_axis=(2, 3), batch_axis=(1,)))
    qkv_kernel = self.param(
        "qkv_kernel", nn.with_logical_partitioning(qkv_init, qkv_axes),
        (dim, 3, self.num_heads, head_dim), jnp.float32)
    qkv_bias = self.param("qkv_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   qkv_axes[1:]),
                          (3, self.num_heads, head_dim), jnp.float32)
    qkv = project(x.astype(self.dtype), qkv_kernel.astype(self.dtype), "...td,dkhc->k...thc")
    bias = qkv_bias.astype(self.dtype)
    return qkv + bias.reshape(3, *(1,) * (qkv.ndim - 3), *bias.shape[1:])

  def project_out(self, y: jax.Array) -> jax.Array:
    """[..., T, heads, head_dim] -> [..., T, embed]: the output projection."""
    heads, head_dim = y.shape[-2:]
    dim = heads * head_dim
    out_kernel = self.param(
        "out_kernel", nn.with_logical_partitioning(xavier(in_axis=(0, 1), out_axis=2),
                                                   ("heads", "head_dim", "embed")),
        (heads, head_dim, dim), jnp.float32)
    out_bias = self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   ("embed",)),
                          (dim,), jnp.float32)
    y = project(y, out_kernel.astype(self.dtype), "...thc,hcd->...td")
    return y + out_bias.astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = (constrain(t, "batch", "tokens", "act_heads", None) for t in self.qkv(x))
    return self.project_out(dot_product_attention(q, k, v))


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = False  # exact (torch's default) or tanh (flax's default)
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Dense(self.hidden, ("embed", "mlp"), self.dtype, bias_init=self.bias_init, name="fc1")(x)
    h = constrain(nn.gelu(h, approximate=self.approximate_gelu), "batch", "tokens", "act_mlp")
    return Dense(x.shape[-1], ("mlp", "embed"), self.dtype, bias_init=self.bias_init,
                 name="fc2")(h)


class Block(nn.Module):
  """Pre-norm transformer block with a shared LayerNorm pair (`norm1`, `norm2`) and, with
  `modality_norms`, one pair per modality (`norm1_a`/`norm2_a`, `norm1_v`/`norm2_v`), as
  CAV-MAE's blocks.

  `modality` None uses the shared pair; "a" or "v" the modality's (CAV-MAE's shared block
  applied to one modality alone). The defaults are CAV-MAE's (timm's); scenic's ViT blocks
  (AV-MAE) take LN eps 1e-6, tanh GELU, per-projection qkv init and MLP biases ~ N(0, 1e-6).
  """
  num_heads: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32
  modality_norms: bool = True
  ln_eps: float = LN_EPS
  approximate_gelu: bool = False
  fused_qkv_init: bool = True
  mlp_bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, modality: str | None = None) -> jax.Array:
    dim = x.shape[-1]
    names = ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v")
    norms = {name: LayerNormParams(name=name)(dim)
             for name in (names if self.modality_norms else ("norm1", "norm2"))}
    suffix = "" if modality is None else f"_{modality}"
    x = constrain(x, "batch", "tokens", "act_embed")
    x = x + Attention(self.num_heads, self.dtype, self.fused_qkv_init, name="attn")(
        layer_norm(x, norms["norm1" + suffix], self.dtype, self.ln_eps))
    x = x + Mlp(int(dim * self.mlp_ratio), self.dtype, self.approximate_gelu,
                self.mlp_bias_init, name="mlp")(
        layer_norm(x, norms["norm2" + suffix], self.dtype, self.ln_eps))
    return constrain(x, "batch", "tokens", "act_embed")
