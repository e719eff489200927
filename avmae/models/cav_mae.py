"""CAV-MAE (Gong et al., ICLR 2023), faithful to the official PyTorch pretraining model.

Token layout as official: the [T, F] log-mel is fed transposed, so the 16x16 audio patches
form an (F/16) x (T/16) grid in frequency-major order (8 x 64 at base size); one RGB frame
gives (H/16) x (W/16) tokens (196). Patch embedding is a Dense on patchified inputs (the same
map as the official stride-16 convolution). Position embeddings are fixed 2-D sin-cos
constants, not parameters (frozen in the official pretraining, so not trainable there either).

The model sees only the visible tokens: masking is decided outside (avmae/masking.py) and
passed in, and the encoders run on `gather_visible` outputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae import losses, masking
from avmae.models.stacks import Stack, make_stack, run_stack
from avmae.models.vit import (Dense, Dtype, LayerNormParams, constrain, layer_norm, sincos_2d,
                              sincos_3d)


def layer_stacks(model) -> dict[str, int]:
  """The stacks of identical blocks that `scan_layers` scans, and their depths, of a CAVMAE
  module or its config: unrolled they are `<name>_<i>`, scanned one `<name>` whose parameters
  have a leading layer axis (avmae/checkpoint.py convert_layers converts)."""
  return {"blocks_a": model.modality_specific_depth, "blocks_v": model.modality_specific_depth,
          "decoder_blocks": model.decoder_depth}


def video_pos_embedding(grid: tuple[int, int, int], dim: int) -> np.ndarray:
  """[T*H*W, dim] fixed position embedding of video tokens on `grid` (time slots, rows,
  columns): 3-D sin-cos; one time slot has no time to encode, so it is the 2-D one
  (official CAV-MAE's)."""
  t, h, w = grid
  return sincos_2d(dim, h, w) if t == 1 else sincos_3d(dim, t, h, w)


def _embedding(name: str, module: nn.Module, dim: int) -> jax.Array:
  init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
  return module.param(name, init, (1, 1, dim), jnp.float32)


class CAVMAE(nn.Module):
  """The pretraining model: two modality encoders, a shared block, a joint decoder."""
  audio_frames: int
  mel_bins: int
  image_size: int
  patch_size: int
  embed_dim: int
  modality_specific_depth: int
  shared_depth: int
  num_heads: int
  mlp_ratio: float
  decoder_embed_dim: int
  decoder_depth: int
  decoder_num_heads: int
  # Video clips: `num_frames` frames [B, T, H, W, 3] cut into tubelets of `tubelet_size`
  # frames x patch x patch (VideoMAE), time-major tokens. 1 and 1: CAV-MAE's one frame
  # [B, H, W, 3], exactly the official model.
  num_frames: int = 1
  tubelet_size: int = 1
  dtype: Dtype = jnp.float32
  # A key of stacks.REMAT_POLICIES: what each block keeps for the backward pass.
  remat: str = "none"
  # One nn.scan per stack of `layer_stacks` (one compiled block, parameters with a leading
  # "layers" axis) instead of a Python loop; blocks_u (shared_depth 1) stays a loop.
  scan_layers: bool = False

  @property
  def layer_stacks(self) -> dict[str, int]:
    return layer_stacks(self)

  @property
  def audio_grid(self) -> tuple[int, int]:
    """(frequency, time) patches."""
    return self.mel_bins // self.patch_size, self.audio_frames // self.patch_size

  @property
  def num_audio_tokens(self) -> int:
    return self.audio_grid[0] * self.audio_grid[1]

  @property
  def video_grid(self) -> tuple[int, int, int]:
    """(time slots, rows, columns) of video tokens."""
    side = self.image_size // self.patch_size
    return self.num_frames // self.tubelet_size, side, side

  @property
  def frames_shape(self) -> tuple[int, ...]:
    """One example's frames: (H, W, 3), or a clip (T, H, W, 3)."""
    clip = (self.num_frames,) if self.num_frames > 1 else ()
    return (*clip, self.image_size, self.image_size, 3)

  @property
  def num_video_tokens(self) -> int:
    t, h, w = self.video_grid
    return t * h * w

  def patchify_video(self, frames: jax.Array) -> jax.Array:
    """One frame [B, H, W, 3] or a clip [B, T, H, W, 3] -> tokens [B, Lv, t*p*p*3]."""
    if self.num_frames == 1:
      return losses.patchify_image(frames, self.patch_size)
    return losses.patchify_clip(frames, self.tubelet_size, self.patch_size)

  def unpatchify_video(self, patches: jax.Array) -> jax.Array:
    if self.num_frames == 1:
      return losses.unpatchify_image(patches, self.patch_size)
    return losses.unpatchify_clip(patches, self.tubelet_size, self.patch_size, self.video_grid)

  def _stack(self, name: str, depth: int, heads: int, scan: bool | None = None) -> Stack:
    block = dict(num_heads=heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype)
    return make_stack(name, depth, block, self.remat,
                      self.scan_layers if scan is None else scan)

  def setup(self):
    p, d = self.patch_size, self.embed_dim
    self.patch_embed_a = Dense(d, ("patch", "embed"), self.dtype)
    self.patch_embed_v = Dense(d, ("patch", "embed"), self.dtype)
    self.modality_a = _embedding("modality_a", self, d)
    self.modality_v = _embedding("modality_v", self, d)
    self.blocks_a = self._stack("blocks_a", self.modality_specific_depth, self.num_heads)
    self.blocks_v = self._stack("blocks_v", self.modality_specific_depth, self.num_heads)
    self.blocks_u = self._stack("blocks_u", self.shared_depth, self.num_heads, scan=False)
    self.norm_a, self.norm_v, self.norm = (LayerNormParams(name=n)
                                           for n in ("norm_a", "norm_v", "norm"))
    self.decoder_embed = Dense(self.decoder_embed_dim, ("embed", None), self.dtype)
    self.mask_token = _embedding("mask_token", self, self.decoder_embed_dim)
    self.decoder_modality_a = _embedding("decoder_modality_a", self, self.decoder_embed_dim)
    self.decoder_modality_v = _embedding("decoder_modality_v", self, self.decoder_embed_dim)
    self.decoder_blocks = self._stack("decoder_blocks", self.decoder_depth,
                                      self.decoder_num_heads)
    self.decoder_norm = LayerNormParams()
    self.decoder_pred_a = Dense(p * p, ("embed", "patch"), self.dtype)
    self.decoder_pred_v = Dense(self.tubelet_size * p * p * 3, ("embed", "patch"), self.dtype)

  def _pos(self, dim: int) -> tuple[jax.Array, jax.Array]:
    return (jnp.asarray(sincos_2d(dim, *self.audio_grid), self.dtype),
            jnp.asarray(video_pos_embedding(self.video_grid, dim), self.dtype))

  def embed_visible(self, audio: jax.Array, frames: jax.Array, mask_a: masking.Mask,
                    mask_v: masking.Mask) -> tuple[jax.Array, jax.Array]:
    """Visible tokens of both modalities with position and modality embeddings [B, K, D].

    Patches are gathered before the (per-token) patch embedding, so masked patches cost
    nothing; the result equals embedding all tokens and gathering, as official does.
    """
    pos_a, pos_v = self._pos(self.embed_dim)
    a = masking.gather_visible(losses.patchify_audio(audio, self.patch_size), mask_a)
    v = masking.gather_visible(self.patchify_video(frames), mask_v)
    a = (self.patch_embed_a(a) + jnp.take(pos_a, mask_a.ids_keep, axis=0)
         + self.modality_a.astype(self.dtype))
    v = (self.patch_embed_v(v) + jnp.take(pos_v, mask_v.ids_keep, axis=0)
         + self.modality_v.astype(self.dtype))
    return (constrain(a, "batch", "tokens", "act_embed"),
            constrain(v, "batch", "tokens", "act_embed"))

  def _shared(self, x: jax.Array, modality: str | None) -> jax.Array:
    for block in self.blocks_u:
      x = block(x, modality)
    return x

  def encode(self, a: jax.Array, v: jax.Array) -> dict[str, jax.Array]:
    """Encoders on (visible) tokens [B, La, D], [B, Lv, D].

    Returns the joint latent (shared block on both, final `norm`) for reconstruction and the
    per-modality latents (shared block with the modality's norms, `norm_a`/`norm_v`) that
    the contrastive loss pools, as the official forward_encoder.
    """
    a, _ = run_stack(self.blocks_a, a)
    v, _ = run_stack(self.blocks_v, v)
    joint = self._shared(jnp.concatenate([a, v], axis=1), None)
    return {
        "latent": layer_norm(joint, self.norm(self.embed_dim), self.dtype),
        "latent_a": layer_norm(self._shared(a, "a"), self.norm_a(self.embed_dim), self.dtype),
        "latent_v": layer_norm(self._shared(v, "v"), self.norm_v(self.embed_dim), self.dtype),
    }

  def hidden_states(self, audio: jax.Array, frames: jax.Array) -> dict[str, list[jax.Array]]:
    """Per-layer tokens of the whole (unmasked) input, each [B, L, D]: "audio" / "video" are
    the embeddings, every modality block's output, and the final features (shared block with
    the modality's norms, then norm_a / norm_v: what the contrastive loss pools, as official
    forward_feat); "audio_video" concatenates the two per layer and ends with the shared
    block on both, then `norm`."""
    batch = audio.shape[0]
    a, v = self.embed_visible(audio, frames, masking.keep_all(batch, self.num_audio_tokens),
                              masking.keep_all(batch, self.num_video_tokens))
    layers_a = [a] + run_stack(self.blocks_a, a, emit=True)[1]
    layers_v = [v] + run_stack(self.blocks_v, v, emit=True)[1]
    joint = [jnp.concatenate([x, y], axis=1) for x, y in zip(layers_a, layers_v)]
    final = {"audio": (layers_a, "a", self.norm_a), "video": (layers_v, "v", self.norm_v),
             "audio_video": (joint, None, self.norm)}
    return {mode: layers + [layer_norm(self._shared(layers[-1], modality),
                                       norm(self.embed_dim), self.dtype)]
            for mode, (layers, modality, norm) in final.items()}

  def features(self, audio: jax.Array, frames: jax.Array) -> dict[str, jax.Array]:
    """Frozen features mean-pooled over tokens: "audio", "video", "audio_video" [B, D] (the
    final features of `hidden_states`), and "<mode>_layers" [B, depth + 2, D]: every layer
    of `hidden_states`, for probes of a chosen layer or a learned weighted sum of layers."""
    out = {}
    for mode, layers in self.hidden_states(audio, frames).items():
      out[f"{mode}_layers"] = jnp.stack([x.astype(jnp.float32).mean(1) for x in layers], axis=1)
      out[mode] = out[f"{mode}_layers"][:, -1]
    return out

  def decode(self, latent: jax.Array, mask_a: masking.Mask, mask_v: masking.Mask
             ) -> tuple[jax.Array, jax.Array]:
    """Predicted patches of every token [B, La, p*p], [B, Lv, t*p*p*3] from the visible latent."""
    x = self.decoder_embed(latent)
    num_visible_a = mask_a.ids_keep.shape[1]
    token = self.mask_token[0, 0].astype(self.dtype)
    a = masking.unshuffle_with_mask_tokens(x[:, :num_visible_a], token, mask_a)
    v = masking.unshuffle_with_mask_tokens(x[:, num_visible_a:], token, mask_v)
    pos_a, pos_v = self._pos(self.decoder_embed_dim)
    a = a + pos_a + self.decoder_modality_a.astype(self.dtype)
    v = v + pos_v + self.decoder_modality_v.astype(self.dtype)
    x = jnp.concatenate([a, v], axis=1)
    x, _ = run_stack(self.decoder_blocks, x)
    x = layer_norm(x, self.decoder_norm(self.decoder_embed_dim), self.dtype)
    return (self.decoder_pred_a(x[:, :self.num_audio_tokens]),
            self.decoder_pred_v(x[:, self.num_audio_tokens:]))

  def __call__(self, audio: jax.Array, frames: jax.Array, mask_a: masking.Mask,
               mask_v: masking.Mask) -> dict[str, jax.Array]:
    """audio [B, T, F] normalised log-mel, frames [B, H, W, 3] (or a clip [B, T, H, W, 3])
    -> latents and predictions."""
    out = self.encode(*self.embed_visible(audio, frames, mask_a, mask_v))
    out["pred_a"], out["pred_v"] = self.decode(out["latent"], mask_a, mask_v)
    return out
