"""Patchification and the CAV-MAE losses (masked reconstruction, audio-visual contrastive).

Losses compute in float32 whatever the input dtype: their inputs are cast at entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit given to pairs involving invalid examples: exp() of it underflows to exactly 0.
_NEG = -1e9


def _patchify(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major tokens, values (row, col, channel)."""
  b, hh, ww, c = x.shape
  h, w = hh // patch, ww // patch
  x = x.reshape(b, h, patch, w, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, patch * patch * c)


def _unpatchify(x: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
  b, _, pp_c = x.shape
  h, w = grid
  c = pp_c // (patch * patch)
  x = x.reshape(b, h, w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * patch, w * patch, c)


def patchify_audio(audio: jax.Array, patch: int) -> jax.Array:
  """[B, T, F] -> [B, (F/p)*(T/p), p*p]; frequency-major tokens, values (freq, time) offsets.

  Official feeds the spectrogram transposed ([B, 1, F, T]), hence this order.
  """
  return _patchify(jnp.swapaxes(audio, 1, 2)[..., None], patch)


def unpatchify_audio(patches: jax.Array, patch: int, mel_bins: int = 128) -> jax.Array:
  """Inverse of `patchify_audio`: [B, L, p*p] -> [B, T, F] with F = mel_bins."""
  f = mel_bins // patch
  x = _unpatchify(patches, patch, (f, patches.shape[1] // f))  # [B, F, T, 1]
  return jnp.swapaxes(x[..., 0], 1, 2)


def patchify_image(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]; values (row, col, channel), as official's
  nchpwq->nhwpqc on NCHW input."""
  return _patchify(images, patch)


def unpatchify_image(patches: jax.Array, patch: int,
                     grid: tuple[int, int] | None = None) -> jax.Array:
  """Inverse of `patchify_image`; `grid` (rows, cols) of patches, square by default."""
  if grid is None:
    side = int(round(patches.shape[1] ** 0.5))
    grid = (side, side)
  return _unpatchify(patches, patch, grid)


def patchify_clip(clips: jax.Array, tubelet: int, patch: int) -> jax.Array:
  """[B, T, H, W, C] -> [B, (T/t)*(H/p)*(W/p), t*p*p*C]: tubelet tokens in time-major order
  (token = (i*H/p + h)*W/p + w), values (time, row, col, channel) as VideoMAE's
  'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)'. With T = t = 1 it is
  `patchify_image` of the one frame."""
  b, tt, hh, ww, c = clips.shape
  t, h, w = tt // tubelet, hh // patch, ww // patch
  x = clips.reshape(b, t, tubelet, h, patch, w, patch, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, t * h * w, tubelet * patch * patch * c)


def unpatchify_clip(patches: jax.Array, tubelet: int, patch: int,
                    grid: tuple[int, int, int]) -> jax.Array:
  """Inverse of `patchify_clip`; `grid` = (T/t, H/p, W/p)."""
  b = patches.shape[0]
  t, h, w = grid
  c = patches.shape[-1] // (tubelet * patch * patch)
  x = patches.reshape(b, t, h, w, tubelet, patch, patch, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, t * tubelet, h * patch, w * patch, c)


def _by_channel(x: jax.Array, channels: int) -> jax.Array:
  """[B, L, P*C] -> float32 [B, L, P, C]."""
  return x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, channels))


def _tubelet_stats(patches: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
  """Per-tubelet, per-channel mean and unbiased std of [B, L, P*C], each [B, L, 1, C]."""
  x = _by_channel(patches, channels)
  return x.mean(axis=-2, keepdims=True), jnp.sqrt(x.var(axis=-2, keepdims=True, ddof=1))


def tubelet_target(patches: jax.Array, channels: int = 3) -> jax.Array:
  """VideoMAE's normalised target: each tubelet's pixels [B, L, P*C], per channel, minus
  their mean over the tubelet, over their unbiased std + 1e-6 (epsilon outside the root)."""
  mean, std = _tubelet_stats(patches, channels)
  return ((_by_channel(patches, channels) - mean) / (std + 1e-6)).reshape(patches.shape)


def from_tubelet_target(pred: jax.Array, patches: jax.Array, channels: int = 3) -> jax.Array:
  """Predictions of `tubelet_target` back in the units of `patches`, with their statistics."""
  mean, std = _tubelet_stats(patches, channels)
  return (_by_channel(pred, channels) * (std + 1e-6) + mean).reshape(pred.shape)


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                        norm_pix: bool = True, valid: jax.Array | None = None) -> jax.Array:
  """Mean over masked patches (of valid examples) of the per-patch mean squared error.

  pred, target: [B, L, P]; mask: [B, L], 1 = masked; valid: [B] bool, False for padding.
  norm_pix normalises each target patch by its mean and unbiased variance (torch.var).
  """
  pred, target, mask = (a.astype(jnp.float32) for a in (pred, target, mask))
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  if valid is not None:
    mask = mask * valid.astype(jnp.float32)[:, None]
  denom = mask.sum()
  # A batch of padding only gives 0 rather than official's 0/0.
  return jnp.where(denom > 0, (per_patch * mask).sum() / jnp.where(denom > 0, denom, 1.0), 0.0)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _column_nce(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Official direction: softmax over axis -2, positive on the diagonal.

  Returns the per-column negative log-likelihood and hit (argmax == own index), [G, S].
  """
  nll = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-2), axis1=-2, axis2=-1)
  hit = jnp.argmax(logits, axis=-2) == jnp.arange(logits.shape[-1])
  return nll, hit.astype(jnp.float32)


def contrastive_loss(audio_rep: jax.Array, video_rep: jax.Array, temperature: float = 0.05,
                     bidirectional: bool = False, group_size: int | None = None,
                     valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """InfoNCE between L2-normalised audio and video representations [B, D].

  Returns (loss, accuracy). Single direction as official (softmax over the audio axis);
  bidirectional averages both. `group_size`: negatives only within consecutive groups of
  that many examples (official's per-GPU loss under DataParallel); None = whole batch.
  `valid` [B] bool: invalid examples are neither negatives nor positives; the mean runs over
  the valid positives of all groups.
  """
  batch, dim = audio_rep.shape
  group = batch if group_size is None else group_size
  if group <= 0 or batch % group:
    raise ValueError(f"batch size {batch} is not divisible by group_size {group_size}")
  a = _l2_normalize(audio_rep.astype(jnp.float32)).reshape(-1, group, dim)
  v = _l2_normalize(video_rep.astype(jnp.float32)).reshape(-1, group, dim)
  # Full precision: at temperature 0.05 a bf16-pass matmul (TPU default) errs by ~0.1 in logits.
  logits = jnp.einsum("gid,gjd->gij", a, v, precision=jax.lax.Precision.HIGHEST) / temperature
  ok = jnp.ones((batch,), bool) if valid is None else valid.astype(bool)
  ok = ok.reshape(-1, group)
  logits = jnp.where(ok[:, :, None] & ok[:, None, :], logits, _NEG)

  nll, hit = _column_nce(logits)
  if bidirectional:
    nll_t, hit_t = _column_nce(jnp.swapaxes(logits, -1, -2))
    nll, hit = (nll + nll_t) / 2, (hit + hit_t) / 2
  weight = ok.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  return (nll * weight).sum() / count, (hit * weight).sum() / count
