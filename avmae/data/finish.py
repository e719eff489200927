"""The log-mel's last steps on the devices: float32, normalisation and time roll.

With a mesh, the host ships the cropped or padded log-mel as stored (float16) with each
row's roll shift (`ROLL`), and `Batches` finishes them in one jitted call on the sharded
batch: half the audio bytes through grain and the host-to-device copy, and the float16
conversion, the costliest per-record step on the host, off the host
(experiments/benchmarks/input_pipeline.py). The numbers are those of the host path
(`pipeline._prepare_audio`), which batches without a mesh and augmentations drawing
per-element numbers (noise) or acting before the crop (roll + gain) still take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROLL = "audio_roll"  # int32 [B]: each row's time-roll shift, while the audio is unfinished


def finish_audio(audio: jax.Array, shift: jax.Array, valid: jax.Array, mean: float, std: float,
                 roll: bool) -> jax.Array:
  """float16 [B, T, mel] as stored -> float32 (x - mean) / std rolled by `shift` along T
  (np.roll's direction); invalid rows (padding, skipped records) stay zeros."""
  x = audio.astype(jnp.float32) - jnp.float32(mean)
  # XLA turns a division by a broadcast scalar into a multiplication by its reciprocal (1 ulp
  # off the host's numbers); the barrier hides the broadcast from it.
  x = x / jax.lax.optimization_barrier(jnp.full(x.shape, std, jnp.float32))
  if roll:  # a gather: every row its own shift, static shapes
    t = x.shape[1]
    index = (jnp.arange(t, dtype=jnp.int32)[None, :] - shift[:, None]) % t
    x = jnp.take_along_axis(x, index[:, :, None], axis=1)
  return jnp.where(valid[:, None, None], x, jnp.float32(0))
