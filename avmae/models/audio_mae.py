"""Audio-MAE (Huang et al., NeurIPS 2022), as the official facebookresearch/AudioMAE
models_mae.py (`mae_vit_*_patch16`, `audio_exp=True`, `in_chans=1`).

Tokens: the [B, T, F] log-mel in p x p patches, time-major (token = t * F/p + f; 64 x 8 at
base), values (time, frequency) within a patch. Fixed 2-D sin-cos position embeddings built
as official with the grid given swapped (`pos_embed`), a cls token (cls_token + the zero
position embedding) prepended after masking. ViT encoder, LayerNorm eps 1e-6, exact GELU.

Decoders (`decoder_mode`):
  1 (official pretraining): 16 Swin-v2 style blocks on the (T/p, F/p) grid, the cls token
    dropped: 4 x 4 windows, odd blocks shifted by (2, 0) (a cyclic roll of time with the
    official region mask of -100), post-norm residuals, cosine attention divided by a
    learned per-head temperature (clamped at 0.01), a continuous relative position bias from
    a 2 -> 384 -> heads ReLU MLP over sign(d) log(1 + |d|) (dropout 0.1 in training, as
    official's `Mlp(drop=0.1)`). Official hard-codes 16 blocks of 16 heads whatever
    decoder_depth / decoder_num_heads say: here they are `swin_depth` / `swin_heads` (16 and
    16 in every official-size config).
  0: `decoder_depth` global pre-norm ViT blocks over the cls token and every patch token.

The encoder sees only the visible tokens: masks come from outside (avmae/masking.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae import losses, masking
from avmae.models.stacks import make_stack, remat_block, run_stack
from avmae.models.vit import (Attention, Block, Dense, Dtype, LayerNormParams, Mlp, constrain,
                              layer_norm, sincos_2d)

LN_EPS = 1e-6  # official norm_layer=partial(nn.LayerNorm, eps=1e-6)
WINDOW, SHIFT = (4, 4), (2, 0)
BIAS_HIDDEN = 384  # the relative position bias MLP's hidden width (timm's meta_hidden_dim)
MASKED = -100.0  # official's score for pairs across shifted-window regions


def pos_embed(dim: int, grid: tuple[int, int]) -> np.ndarray:
  """[1 + T*F, dim] for the (T, F) token grid: official `get_2d_sincos_pos_embed_flexible(
  dim, (F, T), cls_token=True)`, a zero row for the cls token, then for token i = t*F + f
  the 1-D embeddings of i mod T and i div T (the grid is given as (F, T), swapped: with
  official weights, only this construction matches)."""
  t, f = grid
  return np.concatenate([np.zeros((1, dim), np.float32), sincos_2d(dim, f, t)])


def window_and_shift(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
  """timm's `_calc_window_shift`: a window no larger than the grid, no shift along an axis
  the window covers."""
  window = tuple(min(g, w) for g, w in zip(grid, window))
  shift = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift))
  return window, shift


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, windows, wh * ww, C], windows row-major, tokens row-major within
  (JAX or NumPy arrays)."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: jax.Array, window: tuple[int, int], grid: tuple[int, int]
                   ) -> jax.Array:
  """Inverse of `window_partition`: [B, windows, wh * ww, C] -> [B, H, W, C]."""
  b, _, _, c = windows.shape
  (h, w), (wh, ww) = grid, window
  x = windows.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int],
                        shift: tuple[int, int]) -> np.ndarray | None:
  """[windows, A, A] scores added after a cyclic shift (A = wh * ww): 0 within a region of
  the shifted grid, -100 across regions, built as timm's `_make_attention_mask` (including
  its slices for an axis with no shift, which then hold one region); None without a shift."""
  if not any(shift):
    return None
  h, w = grid
  regions = np.zeros((h, w), np.float32)
  count = 0
  for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
    for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
      regions[rows, cols] = count
      count += 1
  labels = window_partition(regions[None, :, :, None], window)[0, ..., 0]  # NumPy: a constant
  return np.where(labels[:, None, :] != labels[:, :, None], MASKED, 0.0).astype(np.float32)


def relative_coords_log(window: tuple[int, int]) -> np.ndarray:
  """[A * A, 2]: sign(d) * log(1 + |d|) of the (row, col) offset of token i from token j,
  pairs (i, j) row-major, as timm's `_make_pair_wise_relative_positions`."""
  coords = np.stack(np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij"))
  coords = coords.reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).reshape(-1, 2)
  rel = rel.astype(np.float32)
  return (np.sign(rel) * np.log1p(np.abs(rel))).astype(np.float32)


class RelativePositionBias(nn.Module):
  """[heads, A, A]: timm's Swin-v2 `meta_mlp` (Linear 2 -> 384, ReLU, dropout, Linear -> heads,
  dropout) of the log-spaced offsets `relative_coords_log` between the window's tokens."""
  num_heads: int
  window: tuple[int, int]
  dropout: float = 0.0

  @nn.compact
  def __call__(self, deterministic: bool = True) -> jax.Array:
    area = self.window[0] * self.window[1]
    drop = nn.Dropout(self.dropout, deterministic=deterministic)
    h = Dense(BIAS_HIDDEN, (None, None), jnp.float32, name="fc1")(
        jnp.asarray(relative_coords_log(self.window)))
    bias = drop(Dense(self.num_heads, (None, "heads"), jnp.float32, name="fc2")(
        drop(jax.nn.relu(h))))  # [A*A, heads]
    return bias.T.reshape(self.num_heads, area, area)


class WindowAttention(Attention):
  """Scaled cosine attention within windows, plus a learned continuous relative position
  bias (timm's Swin-v2 `WindowMultiHeadAttention` as the Audio-MAE decoder uses it)."""
  window: tuple[int, int] = WINDOW
  bias_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """x [B, windows, A, C]; mask [windows, A, A] added to the scores."""
    tau = self.param("tau", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
                     (self.num_heads,), jnp.float32)
    q, k, v = (constrain(t, "batch", None, "tokens", "act_heads", None) for t in self.qkv(x))
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    dots = jnp.einsum("bwqhc,bwkhc->bwhqk", q32, k32)
    norms = jnp.einsum("bwqh,bwkh->bwhqk", jnp.linalg.norm(q32, axis=-1),
                       jnp.linalg.norm(k32, axis=-1))
    scores = dots / jnp.maximum(norms, 1e-6) / jnp.maximum(tau, 0.01)[:, None, None]
    scores = scores + RelativePositionBias(self.num_heads, self.window, self.bias_dropout,
                                           name="meta_mlp")(deterministic)
    if mask is not None:
      scores = scores + jnp.asarray(mask)[:, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.project_out(jnp.einsum("bwhqk,bwkhc->bwqhc", probs, v))


class SwinBlock(nn.Module):
  """timm's (AudioMAE-patched) SwinTransformerBlock: post-norm residuals,
  x + norm1(window_attention(x)), then x + norm2(mlp(x)), on a (T, F) grid of tokens."""
  num_heads: int
  grid: tuple[int, int]
  shift: tuple[int, int]
  mlp_ratio: float
  bias_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x [B, T*F, C] -> [B, T*F, C]."""
    window, shift = window_and_shift(self.grid, WINDOW, self.shift)
    b, length, c = x.shape
    norm1 = LayerNormParams(name="norm1")(c)
    norm2 = LayerNormParams(name="norm2")(c)
    y = x.reshape(b, *self.grid, c)
    if any(shift):
      y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
    y = WindowAttention(num_heads=self.num_heads, dtype=self.dtype, window=window,
                        bias_dropout=self.bias_dropout, name="attn")(window_partition(y, window),
                                     shifted_window_mask(self.grid, window, shift),
                                     deterministic)
    y = window_reverse(y, window, self.grid)
    if any(shift):
      y = jnp.roll(y, shift, axis=(1, 2))
    x = x + layer_norm(y.reshape(b, length, c), norm1, self.dtype, LN_EPS)
    h = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(x)
    return constrain(x + layer_norm(h, norm2, self.dtype, LN_EPS), "batch", "tokens", "act_embed")


def layer_stacks(model) -> dict[str, int]:
  """The stacks of identical blocks `scan_layers` scans (of an AudioMAE or its config): the
  encoder's, and the global decoder's (the Swin decoder alternates shifts: never scanned)."""
  stacks = {"blocks": model.depth}
  if model.decoder_mode == 0:
    stacks["decoder_blocks"] = model.decoder_depth
  return stacks


class AudioMAE(nn.Module):
  """The Audio-MAE pretraining model: ViT encoder with a cls token, a Swin or ViT decoder."""
  audio_frames: int
  mel_bins: int
  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  decoder_embed_dim: int
  decoder_depth: int  # decoder_mode 0 only
  decoder_num_heads: int  # decoder_mode 0 only
  decoder_mode: int  # 1: shifted-window (official pretraining); 0: global attention
  swin_depth: int  # decoder_mode 1 only
  swin_heads: int  # decoder_mode 1 only
  bias_dropout: float = 0.1  # the Swin decoder's relative position bias MLP (official 0.1)
  dtype: Dtype = jnp.float32
  remat: str = "none"  # a key of stacks.REMAT_POLICIES
  scan_layers: bool = False

  @property
  def layer_stacks(self) -> dict[str, int]:
    return layer_stacks(self)

  @property
  def grid(self) -> tuple[int, int]:
    """(time, frequency) patches."""
    return self.audio_frames // self.patch_size, self.mel_bins // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  def patchify(self, audio: jax.Array) -> jax.Array:
    """[B, T, F] -> [B, L, p*p]: time-major tokens, values (time, frequency), as official
    `patchify` ('nchpwq->nhwpqc' of [B, 1, T, F])."""
    return losses.patchify_image(audio[..., None], self.patch_size)

  def unpatchify(self, patches: jax.Array) -> jax.Array:
    return losses.unpatchify_image(patches, self.patch_size, self.grid)[..., 0]

  def setup(self):
    block = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                 modality_norms=False, ln_eps=LN_EPS)
    self.blocks = make_stack("blocks", self.depth, block, self.remat, self.scan_layers)
    self.norm = LayerNormParams(name="norm")
    self.patch_embed = Dense(self.embed_dim, ("patch", "embed"), self.dtype, name="patch_embed")
    token_init = nn.initializers.normal(0.02)
    self.cls_token = self.param("cls_token", nn.with_logical_partitioning(
        token_init, (None, None, "embed")), (1, 1, self.embed_dim), jnp.float32)
    self.mask_token = self.param("mask_token", nn.with_logical_partitioning(
        token_init, (None, None, "embed")), (1, 1, self.decoder_embed_dim), jnp.float32)
    self.decoder_embed = Dense(self.decoder_embed_dim, ("embed", None), self.dtype,
                               name="decoder_embed")
    if self.decoder_mode == 1:
      swin = remat_block(SwinBlock, self.remat)
      self.decoder_blocks = [
          swin(self.swin_heads, self.grid, SHIFT if i % 2 else (0, 0), self.mlp_ratio,
               self.bias_dropout, self.dtype, name=f"decoder_blocks_{i}")
          for i in range(self.swin_depth)]
    else:
      self.decoder_blocks = make_stack(
          "decoder_blocks", self.decoder_depth,
          {**block, "num_heads": self.decoder_num_heads}, self.remat, self.scan_layers)
    self.decoder_norm = LayerNormParams(name="decoder_norm")
    self.decoder_pred = Dense(self.patch_size ** 2, ("embed", "patch"), self.dtype,
                              name="decoder_pred")

  def _norm(self, params: nn.Module, x: jax.Array) -> jax.Array:
    return layer_norm(x, params(x.shape[-1]), self.dtype, LN_EPS)

  def _pos(self, dim: int) -> jax.Array:
    return jnp.asarray(pos_embed(dim, self.grid), self.dtype)

  def embed(self, audio: jax.Array, mask: masking.Mask) -> jax.Array:
    """[B, 1 + K, D]: the cls token, then the visible tokens (in the mask's order) with their
    position embeddings. Patches are gathered before the per-token embedding, which equals
    official's embedding of all and gathering."""
    pos = self._pos(self.embed_dim)
    x = self.patch_embed(masking.gather_visible(self.patchify(audio), mask))
    x = x + jnp.take(pos[1:], mask.ids_keep, axis=0)
    cls = jnp.broadcast_to((self.cls_token[0].astype(self.dtype) + pos[:1])[None],
                           (x.shape[0], 1, self.embed_dim))
    return constrain(jnp.concatenate([cls, x], axis=1), "batch", "tokens", "act_embed")

  def encode(self, x: jax.Array, emit: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    """(the final normalised tokens, with emit every layer: the input, each block's output
    and the final normalised tokens)."""
    y, layers = run_stack(self.blocks, x, emit)
    y = self._norm(self.norm, y)
    return y, [x, *layers, y] if emit else []

  def decode(self, latent: jax.Array, mask: masking.Mask, deterministic: bool = True
             ) -> jax.Array:
    """[B, L, p*p] predictions of every patch from the encoder's [B, 1 + K, D]."""
    x = self.decoder_embed(latent)
    token = self.mask_token[0, 0].astype(self.dtype)
    x = jnp.concatenate([x[:, :1], masking.unshuffle_with_mask_tokens(x[:, 1:], token, mask)],
                        axis=1)
    x = x + self._pos(self.decoder_embed_dim)
    if self.decoder_mode == 1:
      x = x[:, 1:]  # the Swin decoder works on the patch grid only
      for block in self.decoder_blocks:
        x = block(x, deterministic)
    else:
      x = run_stack(self.decoder_blocks, x)[0]
    pred = self.decoder_pred(self._norm(self.decoder_norm, x))
    return pred if self.decoder_mode == 1 else pred[:, 1:]

  def hidden_states(self, audio: jax.Array) -> list[jax.Array]:
    """Per-layer tokens [B, 1 + L, D] of the unmasked input (cls first): the embeddings,
    every block's output and the final normalised tokens (depth + 2 entries)."""
    return self.encode(self.embed(audio, masking.keep_all(audio.shape[0], self.num_tokens)),
                       emit=True)[1]

  def features(self, audio: jax.Array) -> dict[str, jax.Array]:
    """"audio" [B, D]: the mean of the final normalised patch tokens (cls excluded);
    "audio_layers" [B, depth + 2, D]: the same mean of every layer of `hidden_states`."""
    layers = jnp.stack([x[:, 1:].astype(jnp.float32).mean(1)
                        for x in self.hidden_states(audio)], axis=1)
    return {"audio": layers[:, -1], "audio_layers": layers}

  def __call__(self, audio: jax.Array, mask: masking.Mask, deterministic: bool = True
               ) -> dict[str, jax.Array]:
    """audio [B, T, F] normalised log-mel -> {"latent": [B, 1 + K, D] (cls first),
    "pred": [B, L, p*p]}. deterministic=False applies the decoder's dropout (rng
    "dropout")."""
    latent, _ = self.encode(self.embed(audio, mask))
    return {"latent": latent, "pred": self.decode(latent, mask, deterministic)}
