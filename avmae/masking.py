"""Per-sample random token masking (MAE style), as in official CAV-MAE.

Everything is a pure, jittable function of per-example PRNG keys [B] with static shapes:
every sample keeps the same number of tokens K, so visible sequences stack into a dense
[B, K, D] array. One key per example (not one per batch) makes an example's mask independent
of how the batch is split: over devices, processes or accumulation microbatches.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Mask(NamedTuple):
  """A batch of masks. `mask` is 1 where a token is removed, 0 where visible (original order)."""
  ids_keep: jax.Array     # int32 [B, K]: visible token indices, in shuffled order
  ids_restore: jax.Array  # int32 [B, L]: argsort of the shuffle (decoder unshuffles with it)
  mask: jax.Array         # float32 [B, L]


def num_visible(num_tokens: int, mask_ratio: float) -> int:
  """Tokens kept per sample: int(L * (1 - ratio)), rounded down as official."""
  return int(num_tokens * (1 - mask_ratio))


def _mask_from_noise(noise: jax.Array, num_keep: int) -> Mask:
  """Keeps the `num_keep` tokens of smallest noise in each row."""
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  # A token is removed iff its position in the shuffled order is >= K (same as gathering
  # official's [0]*K + [1]*(L-K) with ids_restore).
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return Mask(ids_shuffle[:, :num_keep], ids_restore, mask)


def example_keys(key: jax.Array, batch: int, first: int = 0) -> jax.Array:
  """[batch] keys of examples first .. first + batch - 1 of a global batch drawn with `key`."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(batch))


def _uniform(keys: jax.Array, size: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.uniform(k, (size,)))(keys)


def random_mask(keys: jax.Array, num_tokens: int, mask_ratio: float,
                num_keep: int | None = None) -> Mask:
  """Unstructured masking: a uniformly random subset of K tokens per sample stays visible,
  K = `num_keep`, by default `num_visible(num_tokens, mask_ratio)`."""
  noise = _uniform(keys, num_tokens)
  return _mask_from_noise(noise, num_visible(num_tokens, mask_ratio) if num_keep is None
                          else num_keep)


def _random_lines(noise: jax.Array, count: int) -> jax.Array:
  """bool [B, N]: per row, the `count` lines of smallest uniform noise (a uniform subset)."""
  # Ranks via double argsort: a fixed count per row, with no per-sample Python loop.
  return jnp.argsort(jnp.argsort(noise, axis=1), axis=1) < count


# mode -> (time columns, frequency rows) to mask, in official's arithmetic (order matters for
# int(): int(64 * 0.75 * 0.7) = 33, int(8 * 0.75 * 0.7) = 4).
_STRUCTURED_COUNTS: dict[str, Callable[[int, int, float], tuple[int, int]]] = {
    "time": lambda f, t, r: (int(t * r), 0),
    "freq": lambda f, t, r: (0, int(f * r)),
    "tf": lambda f, t, r: (int(t * r * 0.7), int(f * r * 0.7)),
}


def structured_mask(keys: jax.Array, grid: tuple[int, int], mask_ratio: float, mode: str
                    ) -> Mask:
  """Time / frequency / time-and-frequency masking of frequency-major audio tokens.

  `grid` is (f, t); token index = f_idx * t + t_idx. Whole time columns and/or frequency rows
  are chosen per sample and pushed to the end of the shuffle (noise above 1); K tokens are
  still kept, the rest of the order is decided by the uniform noise, as official.
  """
  if mode not in _STRUCTURED_COUNTS:
    raise ValueError(
        f"unknown structured mask mode {mode!r}; valid: {sorted(_STRUCTURED_COUNTS)}")
  f, t = grid
  num_cols, num_rows = _STRUCTURED_COUNTS[mode](f, t, mask_ratio)
  batch = keys.shape[0]
  # One draw for token, column and row noise (each extra threefry call costs compile time).
  u = _uniform(keys, f * t + t + f)
  noise = u[:, :f * t].reshape(batch, f, t)
  chosen = (_random_lines(u[:, f * t:f * t + t], num_cols)[:, None, :]
            | _random_lines(u[:, f * t + t:], num_rows)[:, :, None])
  # Official writes a constant 1.1, leaving ties between chosen tokens to the sort; when more
  # tokens are chosen than removed ("tf": 388 > 384) adding the noise breaks them at random.
  noise = jnp.where(chosen, 1.1 + noise, noise).reshape(batch, f * t)
  return _mask_from_noise(noise, num_visible(f * t, mask_ratio))


def tube_mask(keys: jax.Array, grid: tuple[int, int], mask_ratio: float) -> Mask:
  """VideoMAE's tube masking of time-major video tokens, `grid` = (time slots, tokens per
  slot): one spatial mask of int(ratio * S) tokens, the same in every time slot."""
  slots, per_slot = grid
  # The same noise in every slot: the sort keeps whole tubes (stable on ties).
  noise = jnp.tile(_uniform(keys, per_slot), (1, slots))
  return _mask_from_noise(noise, num_visible_tube(grid, mask_ratio))


def num_visible_tube(grid: tuple[int, int], mask_ratio: float) -> int:
  """Tokens a tube mask keeps: VideoMAE's rounding, the masked count per slot floors."""
  slots, per_slot = grid
  return slots * (per_slot - int(mask_ratio * per_slot))


def time_freq_mask(keys: jax.Array, grid: tuple[int, int], mask_t_prob: float,
                   mask_f_prob: float) -> Mask:
  """Audio-MAE's 2-D masking of time-major tokens, `grid` = (time, frequency): per example,
  int(T * (1 - mask_t_prob)) time rows and int(F * (1 - mask_f_prob)) frequency columns stay;
  a token is visible where both do. The visible tokens keep their original order (official
  sorts index + 999 * mask)."""
  t, f = grid
  keep_t, keep_f = int(t * (1 - mask_t_prob)), int(f * (1 - mask_f_prob))
  u = _uniform(keys, t + f)
  kept = _random_lines(u[:, :t], keep_t)[:, :, None] & _random_lines(u[:, t:], keep_f)[:, None, :]
  order = jnp.arange(t * f, dtype=jnp.float32) + 999.0 * ~kept.reshape(-1, t * f)
  return _mask_from_noise(order, keep_t * keep_f)


def _tube(keys, num_tokens, mask_ratio, grid):
  if grid is None or grid[0] * grid[1] != num_tokens:
    raise ValueError(f"mask mode 'tube' needs grid=(time slots, tokens per slot) with a "
                     f"product of {num_tokens}, got {grid}")
  return tube_mask(keys, tuple(grid), mask_ratio)


def _unstructured(keys, num_tokens, mask_ratio, grid):
  del grid  # token layout does not matter
  return random_mask(keys, num_tokens, mask_ratio)


def _structured(keys, num_tokens, mask_ratio, grid, *, mode):
  if grid is None or grid[0] * grid[1] != num_tokens:
    raise ValueError(f"mask mode {mode!r} needs grid=(f, t) with f * t == {num_tokens}, "
                     f"got {grid}")
  return structured_mask(keys, tuple(grid), mask_ratio, mode)


MASK_MODES: dict[str, Callable[..., Mask]] = {
    "unstructured": _unstructured,
    "tube": _tube,
    **{m: functools.partial(_structured, mode=m) for m in _STRUCTURED_COUNTS},
}


def make_mask(keys: jax.Array, num_tokens: int, mask_ratio: float,
              mode: str = "unstructured", grid: tuple[int, int] | None = None) -> Mask:
  """Mask of the given mode: "unstructured"; audio "time", "freq" or "tf" (grid (f, t));
  video "tube" (grid (time slots, tokens per slot))."""
  if mode not in MASK_MODES:
    raise ValueError(f"unknown mask mode {mode!r}; valid: {sorted(MASK_MODES)}")
  return MASK_MODES[mode](keys, num_tokens, mask_ratio, grid)


def gather_visible(x: jax.Array, mask: Mask) -> jax.Array:
  """[B, L, D] -> [B, K, D]: the visible tokens, in shuffled order."""
  return jnp.take_along_axis(x, mask.ids_keep[:, :, None], axis=1)


def unshuffle_with_mask_tokens(visible: jax.Array, mask_token: jax.Array, mask: Mask) -> jax.Array:
  """[B, K, D] -> [B, L, D]: mask tokens appended after the visible ones, then unshuffled."""
  b, k, d = visible.shape
  num_tokens = mask.ids_restore.shape[1]
  fill = jnp.broadcast_to(mask_token.astype(visible.dtype), (b, num_tokens - k, d))
  full = jnp.concatenate([visible, fill], axis=1)
  return jnp.take_along_axis(full, mask.ids_restore[:, :, None], axis=1)


def keep_all(batch: int, num_tokens: int) -> Mask:
  """The mask that keeps every token in order (evaluation: the encoders see the whole input)."""
  ids = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
  return Mask(ids, ids, jnp.zeros((batch, num_tokens), jnp.float32))
