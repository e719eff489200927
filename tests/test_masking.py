"""Masks: counts, consistency, determinism, structured layouts, gather/unshuffle round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avmae import masking

F, T = 8, 64  # official audio grid: 8 frequency x 64 time blocks, frequency-major
L = F * T

# Jitted (static shapes and modes): checks jittability and avoids op-by-op dispatch. Called
# as (key, batch, ...): the examples of a batch drawn with one key.
random_mask = jax.jit(lambda key, b, *a: masking.random_mask(masking.example_keys(key, b), *a),
                      static_argnums=(1, 2, 3))
structured_mask = jax.jit(
    lambda key, b, *a: masking.structured_mask(masking.example_keys(key, b), *a),
    static_argnums=(1, 2, 3, 4))
make_mask = jax.jit(lambda key, b, *a: masking.make_mask(masking.example_keys(key, b), *a),
                    static_argnums=(1, 2, 3, 4, 5))


def check_consistent(m: masking.Mask, num_tokens: int, num_keep: int):
  """Shapes, dtypes and the relations between ids_keep, ids_restore and mask."""
  ids_keep, ids_restore, mask = (np.asarray(a) for a in m)
  b = mask.shape[0]
  assert ids_keep.shape == (b, num_keep) and ids_keep.dtype == np.int32
  assert ids_restore.shape == (b, num_tokens) and ids_restore.dtype == np.int32
  assert mask.shape == (b, num_tokens) and mask.dtype == np.float32
  np.testing.assert_array_equal(mask.sum(1), num_tokens - num_keep)
  np.testing.assert_array_equal(np.take_along_axis(mask, ids_keep, 1), 0)
  for row_keep, row_restore in zip(ids_keep, ids_restore):
    assert len(set(row_keep.tolist())) == num_keep
    np.testing.assert_array_equal(np.sort(row_restore), np.arange(num_tokens))
    # ids_restore inverts the shuffle, whose first K entries are ids_keep.
    np.testing.assert_array_equal(row_restore[row_keep], np.arange(num_keep))


def test_num_visible_rounds_down_as_official():
  assert masking.num_visible(512, 0.75) == 128
  assert masking.num_visible(196, 0.75) == 49
  assert masking.num_visible(10, 0.7) == int(10 * (1 - 0.7))
  assert masking.num_visible(196, 0.8) == 39


def test_random_mask_counts_and_consistency():
  m = random_mask(jax.random.key(0), 6, 196, 0.75)
  check_consistent(m, 196, 49)
  assert len({tuple(r) for r in np.asarray(m.mask).astype(int).tolist()}) == 6


def test_random_mask_deterministic_per_key_and_step():
  key = jax.random.key(3)
  a = random_mask(jax.random.fold_in(key, 1), 4, L, 0.75)
  b = random_mask(jax.random.fold_in(key, 1), 4, L, 0.75)
  c = random_mask(jax.random.fold_in(key, 2), 4, L, 0.75)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.mask, c.mask)


def test_random_mask_is_uniform_over_tokens():
  m = random_mask(jax.random.key(1), 2000, L, 0.75)
  freq = np.asarray(m.mask).mean(0)
  assert abs(freq.mean() - 0.75) < 1e-6 and np.all(np.abs(freq - 0.75) < 0.06)


@pytest.mark.parametrize("ratio,cols", [(0.75, 48), (0.5, 32)])
def test_time_mask_removes_whole_columns(ratio, cols):
  b = 5
  m = structured_mask(jax.random.key(0), b, (F, T), ratio, "time")
  check_consistent(m, L, masking.num_visible(L, ratio))
  grid = np.asarray(m.mask).reshape(b, F, T)
  col_masked = grid.all(axis=1)  # [B, T]
  np.testing.assert_array_equal(col_masked.sum(1), cols)
  # Every removed token lies in a wholly removed column, nothing else is removed.
  np.testing.assert_array_equal(grid, np.broadcast_to(col_masked[:, None, :], grid.shape))
  assert len({tuple(r) for r in col_masked.tolist()}) == b


def test_freq_mask_removes_whole_rows():
  b = 5
  m = structured_mask(jax.random.key(1), b, (F, T), 0.75, "freq")
  check_consistent(m, L, 128)
  grid = np.asarray(m.mask).reshape(b, F, T)
  row_masked = grid.all(axis=2)  # [B, F]
  np.testing.assert_array_equal(row_masked.sum(1), 6)
  np.testing.assert_array_equal(grid, np.broadcast_to(row_masked[:, :, None], grid.shape))


def test_tf_mask_removes_rows_and_columns():
  # int(64*.75*.7) = 33 columns and int(8*.75*.7) = 4 rows: 388 chosen tokens, 384 removed;
  # the 4 x 31 tokens outside chosen rows and columns are all kept, plus 4 chosen ones.
  b = 6
  m = structured_mask(jax.random.key(2), b, (F, T), 0.75, "tf")
  check_consistent(m, L, 128)
  vis = 1 - np.asarray(m.mask).reshape(b, F, T)
  for v in vis:
    free_rows = v.sum(1) >= 31  # unchosen rows; chosen ones keep at most 4 tokens
    assert free_rows.sum() == 4
    free_cols = v[free_rows].all(0)
    assert free_cols.sum() >= 31
    assert v.sum() - v[np.ix_(free_rows, free_cols)].sum() <= 4


def test_structured_columns_are_uniform():
  m = structured_mask(jax.random.key(4), 2000, (F, T), 0.75, "time")
  col_freq = np.asarray(m.mask).reshape(-1, F, T)[:, 0, :].mean(0)
  assert np.all(np.abs(col_freq - 0.75) < 0.06)


def test_make_mask_dispatch():
  key = jax.random.key(5)
  for x, y in zip(make_mask(key, 3, L, 0.75), random_mask(key, 3, L, 0.75)):
    np.testing.assert_array_equal(x, y)
  got = make_mask(key, 3, L, 0.75, "freq", (F, T))
  want = structured_mask(key, 3, (F, T), 0.75, "freq")
  np.testing.assert_array_equal(got.mask, want.mask)
  keys = masking.example_keys(key, 3)
  with pytest.raises(ValueError, match="unstructured.*"):
    masking.make_mask(keys, L, 0.75, mode="block")
  with pytest.raises(ValueError, match="grid"):
    masking.make_mask(keys, L, 0.75, mode="time")
  with pytest.raises(ValueError, match="valid"):
    masking.structured_mask(keys, (F, T), 0.75, "diagonal")


@pytest.mark.parametrize("mode", ["unstructured", "tf"])
def test_an_examples_mask_does_not_depend_on_how_the_batch_is_split(mode):
  # Examples 4..7 of a batch of 8, drawn as their own microbatch, get the same masks.
  key = jax.random.key(9)
  whole = masking.make_mask(masking.example_keys(key, 8), L, 0.75, mode, (F, T))
  part = masking.make_mask(masking.example_keys(key, 4, first=4), L, 0.75, mode, (F, T))
  for x, y in zip(whole, part):
    np.testing.assert_array_equal(np.asarray(x)[4:], y)
  assert not np.array_equal(np.asarray(whole.mask)[:4], part.mask)


def test_gather_unshuffle_round_trip():
  b, n, d = 3, 20, 5
  x = jax.random.normal(jax.random.key(7), (b, n, d))
  m = random_mask(jax.random.key(8), b, n, 0.6)
  vis = jax.jit(masking.gather_visible)(x, m)
  assert vis.shape == (b, 8, d)
  np.testing.assert_array_equal(vis, np.take_along_axis(np.asarray(x), m.ids_keep[..., None], 1))
  token = jnp.arange(d, dtype=jnp.float32) + 100
  full = np.asarray(jax.jit(masking.unshuffle_with_mask_tokens)(vis, token, m))
  masked = np.asarray(m.mask, bool)[..., None]
  np.testing.assert_array_equal(full, np.where(masked, np.asarray(token), np.asarray(x)))
