"""Stacks of identical transformer blocks, as the models build them: unrolled or under
nn.scan, with a rematerialisation policy. Unrolled, a stack is blocks `<name>_<i>`; scanned,
one module `<name>` whose parameters have a leading "layers" axis (avmae/checkpoint.py
convert_layers converts between the two)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avmae.models.vit import Block

# Rematerialisation per block: "none" keeps every activation; "full" keeps only each block's
# input and recomputes the rest in the backward pass; "dots" also keeps the matmul outputs
# that have no batch dimension (the projections), recomputing attention and elementwise ops.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Stack = nn.Module | list[Block]


class _Layer(Block):
  """A Block as a scan body: (x, emit) -> (x, the layer's output if emit else None)."""

  def __call__(self, x: jax.Array, emit: bool) -> tuple[jax.Array, jax.Array | None]:
    # The carry must keep its dtype; a block's output is its input's dtype already.
    y = super().__call__(x, None).astype(x.dtype)
    return y, (y if emit else None)


def remat_block(block: type[nn.Module], remat: str) -> type[nn.Module]:
  """`block` recomputed in the backward pass as REMAT_POLICIES[remat] says."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r}; one of {sorted(REMAT_POLICIES)}")
  if remat == "none":
    return block
  # Same parameter names: checkpoints do not depend on it. The second argument (`modality`
  # of a Block, `emit` of a _Layer) is static; callers always pass it, as remat needs.
  return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=(2,))


def make_stack(name: str, depth: int, block: dict[str, Any], remat: str, scan_layers: bool
               ) -> Stack:
  """`depth` Blocks with fields `block`: a Python list, or with scan_layers one scanned
  _Layer (remat inside the scan, so each iteration recomputes only its own block). Call it
  in a module's setup."""
  if not scan_layers:
    return [remat_block(Block, remat)(**block, name=f"{name}_{i}") for i in range(depth)]
  scanned = nn.scan(remat_block(_Layer, remat), variable_axes={"params": 0},
                    split_rngs={"params": True}, in_axes=nn.broadcast, length=depth,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(**block, name=name)


def _written_out(g: jax.Array) -> jax.Array:
  """g itself, produced by an XLA while loop whose trip count XLA cannot know (two
  negations, or four when g's first element is NaN), so XLA must write g out whole."""
  trips = 2 * (1 + jnp.isnan(g[(0,) * g.ndim]).astype(jnp.int32))
  return jax.lax.fori_loop(0, trips, lambda _, h: -h, g)


@jax.custom_vjp
def gradient_fence(x: jax.Array) -> jax.Array:
  """The identity, whose gradient a CPU step writes out whole (elsewhere: the identity).

  Between unrolled blocks, XLA:CPU fuses each block's transposed residual-gradient copy
  (for its weight-gradient dots) with the LayerNorm backward of every later block,
  recomputing the chain once per block: quadratic in depth (CAV-MAE base, batch 4: 519 ops
  in the first decoder block's copy, 53 GB accessed a step). An optimization_barrier does
  not stop it (XLA:CPU removes barriers before fusing); a loop XLA cannot unroll does, as
  the carry of a scan over the blocks does. docs/speed.md has the figures."""
  return x


def _fence_fwd(x: jax.Array) -> tuple[jax.Array, None]:
  return x, None


def _fence_bwd(_, g: jax.Array) -> tuple[jax.Array]:
  return (jax.lax.platform_dependent(g, cpu=_written_out, default=lambda h: h),)


gradient_fence.defvjp(_fence_fwd, _fence_bwd)


def run_stack(stack: Stack, x: jax.Array, emit: bool = False
              ) -> tuple[jax.Array, list[jax.Array]]:
  """(output, every layer's output if emit else []) of a stack made by `make_stack`."""
  if not isinstance(stack, nn.Module):
    layers = []
    for i, block in enumerate(stack):
      x = block(gradient_fence(x) if i else x, None)
      layers.append(x)
    return x, layers if emit else []
  x, ys = stack(x, emit)
  return x, [ys[i] for i in range(ys.shape[0])] if emit else []
