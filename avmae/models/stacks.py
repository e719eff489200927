"""Stacks of identical transformer blocks, as the models build them: unrolled or under
nn.scan, with a rematerialisation policy. Unrolled, a stack is blocks `<name>_<i>`; scanned,
one module `<name>` whose parameters have a leading "layers" axis (avmae/checkpoint.py
convert_layers converts between the two)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

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


def run_stack(stack: Stack, x: jax.Array, emit: bool = False
              ) -> tuple[jax.Array, list[jax.Array]]:
  """(output, every layer's output if emit else []) of a stack made by `make_stack`."""
  if not isinstance(stack, nn.Module):
    layers = []
    for block in stack:
      x = block(x, None)
      layers.append(x)
    return x, layers if emit else []
  x, ys = stack(x, emit)
  return x, [ys[i] for i in range(ys.shape[0])] if emit else []
