"""Linear probes on frozen features, a whole learning-rate x weight-decay grid trained at once.

Heads (`HEADS`): "linear"; "bn_linear" (MAE: BatchNorm without affine, then linear);
"ln_linear" (CAV-MAE: LayerNorm, then linear). Params are flat dicts of arrays; `train_sweep`
gives them a leading grid axis G = len(lrs) * len(weight_decays), ordered lr major, wd minor:
point g = i * len(weight_decays) + j is (lrs[i], weight_decays[j]).

Features are [N, D], or [N, L, D] per-layer stacks, which every head first combines by a learned
softmax-weighted sum over L (AV-SUPERB's weighted-layer probe).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = dict[str, jax.Array]

BN_EPS = 1e-6  # MAE's BatchNorm1d(affine=False, eps=1e-6)
LN_EPS = 1e-5  # torch nn.LayerNorm's default, as CAV-MAE's head
FROZEN = ("mean", "var")  # statistics of the fixed train features: never trained
DECAYED = ("w",)  # AdamW decays the weight matrix only, not biases, norm or layer weights


class Head(NamedTuple):
  init: Callable[[jax.Array, jax.Array, int], Params]  # (key, train_x, num_classes)
  apply: Callable[[Params, jax.Array], jax.Array]  # (params, x) -> logits [N, C]


def _combine(p: Params, x: jax.Array) -> jax.Array:
  """[N, L, D] -> [N, D] by the learned softmax weights over layers; [N, D] passes through."""
  if x.ndim == 2:
    return x
  return jnp.einsum("l,nld->nd", jax.nn.softmax(p["layer_logits"]), x)


def _init_linear(key: jax.Array, x: jax.Array, num_classes: int) -> Params:
  # Small normal, as MAE's head (trunc_normal std 0.01); the same key gives every grid point
  # the same start, so the points differ by (lr, wd) only.
  p = {"w": 0.01 * jax.random.normal(key, (x.shape[-1], num_classes), jnp.float32),
       "b": jnp.zeros((num_classes,), jnp.float32)}
  return p if x.ndim == 2 else {**p, "layer_logits": jnp.zeros((x.shape[1],), jnp.float32)}


def _apply_linear(p: Params, x: jax.Array) -> jax.Array:
  return _combine(p, x) @ p["w"] + p["b"]


def _init_bn(key: jax.Array, x: jax.Array, num_classes: int) -> Params:
  # Features are fixed, so BatchNorm's statistics are those of the whole train set, computed
  # once (per layer for [N, L, D]) and frozen; test features are standardised with them too.
  return {**_init_linear(key, x, num_classes), "mean": x.mean(0), "var": x.var(0)}


def _apply_bn(p: Params, x: jax.Array) -> jax.Array:
  return _apply_linear(p, (x - p["mean"]) * jax.lax.rsqrt(p["var"] + BN_EPS))


def _init_ln(key: jax.Array, x: jax.Array, num_classes: int) -> Params:
  return {**_init_linear(key, x, num_classes), "scale": jnp.ones(x.shape[-1:], jnp.float32),
          "bias": jnp.zeros(x.shape[-1:], jnp.float32)}


def _apply_ln(p: Params, x: jax.Array) -> jax.Array:
  x = _combine(p, x)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  x_hat = (x - mean) * jax.lax.rsqrt(var + LN_EPS)
  # = (x_hat * scale + bias) @ w + b, arranged so that under the grid vmap x_hat (the same for
  # every point) meets all G folded weights in one matmul, not G copies of the affine batch.
  return x_hat @ (p["scale"][:, None] * p["w"]) + (p["bias"] @ p["w"] + p["b"])


HEADS: dict[str, Head] = {
    "linear": Head(_init_linear, _apply_linear),
    "bn_linear": Head(_init_bn, _apply_bn),
    "ln_linear": Head(_init_ln, _apply_ln),
}

# Keyed by `multilabel`. Single-label targets are one-hot rows, which softmax CE takes as is.
LOSSES: dict[bool, Callable[[jax.Array, jax.Array], jax.Array]] = {
    False: lambda logits, y: optax.softmax_cross_entropy(logits, y).mean(),
    True: lambda logits, y: optax.sigmoid_binary_cross_entropy(logits, y).mean(),
}


def get_head(name: str) -> Head:
  if name not in HEADS:
    raise ValueError(f"unknown probe head {name!r}; valid heads: {sorted(HEADS)}")
  return HEADS[name]


def _split(p: Params) -> tuple[Params, Params]:
  """(trainable, frozen) parts of the params."""
  return ({k: v for k, v in p.items() if k not in FROZEN},
          {k: v for k, v in p.items() if k in FROZEN})


def _optimizer(lr: jax.Array, wd: jax.Array, steps: int) -> optax.GradientTransformation:
  # Built per grid point inside the vmapped step: lr and wd are traced, so one compiled program
  # serves every grid point; the cosine schedule multiplies the point's lr.
  cosine = optax.cosine_decay_schedule(1.0, max(steps, 1))
  mask = lambda p: {k: k in DECAYED for k in p}
  return optax.adamw(lambda t: lr * cosine(t), weight_decay=wd, mask=mask)


def _update(trainable: Params, state: Any, lr: jax.Array, wd: jax.Array, frozen: Params,
            xb: jax.Array, yb: jax.Array, head: str, multilabel: bool, steps: int
            ) -> tuple[Params, Any]:
  """One AdamW step of one grid point on the batch (xb, yb)."""
  loss = lambda t: LOSSES[multilabel](HEADS[head].apply({**t, **frozen}, xb), yb)
  grads = jax.grad(loss)(trainable)
  updates, state = _optimizer(lr, wd, steps).update(grads, state, trainable)
  return optax.apply_updates(trainable, updates), state


def _shared(frozen: Params, over_grid: bool) -> Params:
  # Frozen statistics are the same for every grid point (all from the one train set): passed
  # once, unbatched, the standardised batch is computed once and shared by the whole grid.
  return {k: v[0] for k, v in frozen.items()} if over_grid else frozen


@functools.partial(jax.jit, static_argnames=("head", "multilabel", "steps", "over_grid"),
                   donate_argnums=(0, 1))
def _step(params, state, lrs, wds, x, y, idx, *, head, multilabel, steps, over_grid):
  # The batch is gathered once and shared by every grid point (in_axes None).
  step = functools.partial(_update, head=head, multilabel=multilabel, steps=steps)
  step = jax.vmap(step, in_axes=(0, 0, 0, 0, None, None, None)) if over_grid else step
  trained, frozen = _split(params)
  trained, state = step(trained, state, lrs, wds, _shared(frozen, over_grid), x[idx], y[idx])
  return {**trained, **frozen}, state


def _batch_indices(key: jax.Array, n: int, batch_size: int, steps: int) -> np.ndarray:
  """[steps, batch_size] indices: fresh permutations per epoch, concatenated, so every example
  is seen once per epoch (batches may straddle two epochs)."""
  epochs = -(-steps * batch_size // n)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
  return np.asarray(perms).reshape(-1)[:steps * batch_size].reshape(steps, batch_size)


def _fit(train_x, train_y, *, head, multilabel, lrs, wds, steps, batch_size, seed, over_grid):
  spec = get_head(head)
  if len(lrs) == 0 or len(wds) == 0:
    raise ValueError(f"empty probe grid: lrs={list(lrs)}, weight_decays={list(wds)}")
  x, y = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.float32)
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  params = spec.init(init_key, x, y.shape[1])
  lr, wd = (jnp.asarray(v, jnp.float32) for v in zip(*[(a, b) for a in lrs for b in wds]))
  if over_grid:
    params = jax.tree.map(lambda a: jnp.repeat(a[None], lr.shape[0], 0), params)
  else:  # one point, run without vmap: an independent check of the vmapped program
    lr, wd = lr[0], wd[0]
  init = lambda p, lr, wd: _optimizer(lr, wd, steps).init(_split(p)[0])
  state = (jax.vmap(init) if over_grid else init)(params, lr, wd)
  batches = _batch_indices(data_key, x.shape[0], min(batch_size, x.shape[0]), steps)
  for idx in batches:  # a jitted step per iteration: simple, the per-step cost is the step's
    params, state = _step(params, state, lr, wd, x, y, idx, head=head, multilabel=multilabel,
                          steps=steps, over_grid=over_grid)
  return params if over_grid else jax.tree.map(lambda a: a[None], params)


def train_sweep(train_x: jax.Array, train_y: jax.Array, *, head: str, multilabel: bool,
                lrs: Sequence[float], weight_decays: Sequence[float], steps: int,
                batch_size: int, seed: int) -> Params:
  """Trains a probe for every (lr, wd) at once (vmapped; the same minibatches for all).

  train_x [N, D] (or [N, L, D]), train_y [N, C] multi-hot float (one-hot if not multilabel).
  AdamW (decay on weights only), cosine schedule over `steps`, mean softmax CE / sigmoid BCE.
  Returns params with a leading grid axis G = len(lrs) * len(weight_decays), lr major.
  """
  return _fit(train_x, train_y, head=head, multilabel=multilabel, lrs=lrs, wds=weight_decays,
              steps=steps, batch_size=batch_size, seed=seed, over_grid=True)


def train_single(train_x: jax.Array, train_y: jax.Array, *, head: str, multilabel: bool,
                 lr: float, weight_decay: float, steps: int, batch_size: int, seed: int
                 ) -> Params:
  """`train_sweep` for one (lr, wd), without vmap; params keep a grid axis of 1 for `predict`."""
  return _fit(train_x, train_y, head=head, multilabel=multilabel, lrs=[lr],
              wds=[weight_decay], steps=steps, batch_size=batch_size, seed=seed,
              over_grid=False)


@functools.partial(jax.jit, static_argnames="head")
def _predict(params: Params, x: jax.Array, head: str) -> jax.Array:
  trainable, frozen = _split(params)
  apply = lambda t, f, x: HEADS[head].apply({**t, **f}, x)
  return jax.vmap(apply, in_axes=(0, None, None))(trainable, _shared(frozen, True), x)


def predict(params: Params, x: jax.Array, head: str) -> jax.Array:
  """Logits [G, N, C] of every grid point for features x [N, D] (or [N, L, D]).

  bn_linear's frozen train statistics are taken from point 0: `train_sweep` gives every point
  the same ones.
  """
  get_head(head)
  return _predict(params, jnp.asarray(x, jnp.float32), head)


@jax.jit
def ridge_probe(train_x: jax.Array, train_y: jax.Array, test_x: jax.Array, l2: float
                ) -> jax.Array:
  """Closed-form ridge regression onto the targets: scores [N_test, C], a fast sanity check.

  Features are standardised with train statistics; centring makes the (unpenalised) bias the
  mean target exactly, and W solves (X^T X + l2 I) W = X^T (Y - mean Y).
  """
  x, y = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.float32)
  mean, scale = x.mean(0), jax.lax.rsqrt(x.var(0) + BN_EPS)
  xs, y_mean = (x - mean) * scale, y.mean(0)
  hi = jax.lax.Precision.HIGHEST  # Gram matrices must not drop to TF32/bf16 on accelerators
  gram = jnp.matmul(xs.T, xs, precision=hi) + l2 * jnp.eye(x.shape[1], dtype=jnp.float32)
  w = jax.scipy.linalg.solve(gram, jnp.matmul(xs.T, y - y_mean, precision=hi), assume_a="pos")
  return jnp.matmul((jnp.asarray(test_x, jnp.float32) - mean) * scale, w, precision=hi) + y_mean


def select_best(metric_per_point: Sequence[float] | np.ndarray) -> int:
  """Index of the best grid point: argmax, ties -> the first; NaN (diverged) never wins."""
  m = np.asarray(metric_per_point, np.float64)
  return int(np.argmax(np.where(np.isnan(m), -np.inf, m)))
