"""Audiovisual MAE (Georgescu et al., ICCV 2023), as the official scenic code
(projects/av_mae/vivit_multimodal.py; docs/av_mae_reference.md has the facts).

Tokens: the log-mel [B, T, F] in p x p patches, time-major (frequency fastest; a time
remainder is dropped, as the official VALID convolution); video in t x p x p tubelets,
time-major. Each modality gets a fixed 1-D sin-cos embedding of its flattened token index.
How the modalities meet is configuration: `encoder_strategy` and `decoder_strategy` pick
which of the same blocks each modality goes through (ENCODERS, DECODERS).

Modalities are "a" (the spectrogram) and "v" (the video). The encoders see only visible
tokens: masks come from outside (avmae/masking.py), as in CAV-MAE.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from avmae import losses, masking
from avmae.models.stacks import make_stack, run_stack
from avmae.models.vit import (Dense, Dtype, LayerNormParams, constrain, layer_norm,
                              sincos_1d_interleaved)

LN_EPS = 1e-6  # scenic's LayerNorm
MODALITIES = ("a", "v")
Tokens = dict[str, jax.Array]  # modality -> [B, L, D]

# strategy -> (the stack each modality goes through alone, "{m}" the modality, or None;
# the stack both go through concatenated, or None). Each stack ends with its own LayerNorm.
ENCODERS = {
    "separate_encoders": ("encoder_{m}", None),
    "same_encoder": ("encoder", None),
    "concat_and_encode": (None, "encoder"),
    # mid fusion: depth - fusion_layers layers per modality, then fusion_layers joint ones
    "separate_encoders_and_concat": ("encoder_{m}", "encoder_fusion"),
}
DECODERS = {
    "separate_decoders": ("decoder_{m}", None),
    "same_decoder": ("decoder", None),
    "concat_and_decode": (None, "decoder"),
}


def num_visible(num_tokens: int, mask_ratio: float, mode: str = "unstructured",
                slots: int = 1) -> int:
  """Tokens kept per example: official floors the masked count, int(ratio * L); a tube mask
  over `slots` time slots keeps VideoMAE's count (masking.num_visible_tube)."""
  if mode == "tube":
    return masking.num_visible_tube((slots, num_tokens // slots), mask_ratio)
  return num_tokens - int(mask_ratio * num_tokens)


def layer_stacks(model) -> dict[str, int]:
  """The model's stacks of identical blocks and their depths (of an AVMAE or its config)."""
  alone, joint = ENCODERS[model.encoder_strategy]
  fused = model.fusion_layers if alone and joint else 0
  stacks = {alone.format(m=m): model.depth - fused for m in MODALITIES} if alone else {}
  if joint:
    stacks[joint] = fused or model.depth
  alone, joint = DECODERS[model.decoder_strategy]
  stacks.update({alone.format(m=m): model.decoder_depth for m in MODALITIES} if alone else {})
  if joint:
    stacks[joint] = model.decoder_depth
  return stacks


def _concat(xs: Tokens) -> jax.Array:
  return jnp.concatenate(list(xs.values()), axis=1)


class AVMAE(nn.Module):
  """Spectrogram and video encoders and decoders, combined by strategy."""
  audio_frames: int
  mel_bins: int
  image_size: int
  patch_size: int
  num_frames: int
  tubelet_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  decoder_embed_dim: int
  decoder_depth: int
  decoder_num_heads: int
  encoder_strategy: str
  decoder_strategy: str
  fusion_layers: int  # joint encoder layers of separate_encoders_and_concat
  # Decode each modality from the other's visible tokens and its own mask tokens only.
  use_inpainting: bool
  dtype: Dtype = jnp.float32
  remat: str = "none"  # a key of stacks.REMAT_POLICIES
  scan_layers: bool = False

  @property
  def layer_stacks(self) -> dict[str, int]:
    return layer_stacks(self)

  @property
  def audio_grid(self) -> tuple[int, int]:
    """(time, frequency) patches."""
    return self.audio_frames // self.patch_size, self.mel_bins // self.patch_size

  @property
  def video_grid(self) -> tuple[int, int, int]:
    """(time slots, rows, columns) of video tokens."""
    side = self.image_size // self.patch_size
    return self.num_frames // self.tubelet_size, side, side

  @property
  def num_tokens(self) -> dict[str, int]:
    (t, f), (s, h, w) = self.audio_grid, self.video_grid
    return {"a": t * f, "v": s * h * w}

  @property
  def frames_shape(self) -> tuple[int, ...]:
    """One example's frames: (H, W, 3), or a clip (T, H, W, 3)."""
    clip = (self.num_frames,) if self.num_frames > 1 else ()
    return (*clip, self.image_size, self.image_size, 3)

  def patchify(self, audio: jax.Array, frames: jax.Array) -> Tokens:
    """The reconstruction targets: spectrogram [B, La, p*p] (values time, frequency) and
    video [B, Lv, t*p*p*3] (values time, row, column, channel)."""
    p = self.patch_size
    t, f = self.audio_grid
    clips = frames if frames.ndim == 5 else frames[:, None]
    return {"a": losses.patchify_image(audio[:, :t * p, :f * p, None], p),
            "v": losses.patchify_clip(clips, self.tubelet_size, p)}

  def unpatchify(self, patches: Tokens) -> dict[str, jax.Array]:
    """Inverse of `patchify` (a dropped time remainder stays dropped)."""
    p = self.patch_size
    frames = losses.unpatchify_clip(patches["v"], self.tubelet_size, p, self.video_grid)
    return {"a": losses.unpatchify_image(patches["a"], p, self.audio_grid)[..., 0],
            "v": frames if self.num_frames > 1 else frames[:, 0]}

  def setup(self):
    block = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                 modality_norms=False, ln_eps=LN_EPS, approximate_gelu=True,
                 fused_qkv_init=False, mlp_bias_init=nn.initializers.normal(1e-6))
    decoder_block = {**block, "num_heads": self.decoder_num_heads}
    self.stacks = {
        name: make_stack(name, depth, block if name.startswith("encoder") else decoder_block,
                         self.remat, self.scan_layers)
        for name, depth in self.layer_stacks.items()}
    self.norms = {name: LayerNormParams(name=f"{name}_norm") for name in self.layer_stacks}
    # A VALID convolution's lecun-normal kernel and zero bias, on patchified input.
    self.patch_embed = {m: Dense(self.embed_dim, ("patch", "embed"), self.dtype,
                                 kernel_init=nn.initializers.lecun_normal(),
                                 name=f"patch_embed_{m}") for m in MODALITIES}
    self.decoder_embed = {m: Dense(self.decoder_embed_dim, ("embed", None), self.dtype,
                                   name=f"decoder_embed_{m}") for m in MODALITIES}
    self.mask_token = {m: self.param(f"mask_token_{m}", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None, "embed")), (1, 1, self.decoder_embed_dim),
        jnp.float32) for m in MODALITIES}
    p, t = self.patch_size, self.tubelet_size
    self.decoder_pred = {m: Dense(size, ("embed", "patch"), self.dtype,
                                  kernel_init=nn.initializers.zeros, name=f"decoder_pred_{m}")
                         for m, size in (("a", p * p), ("v", t * p * p * 3))}

  def _pos(self, dim: int) -> Tokens:
    return {m: jnp.asarray(sincos_1d_interleaved(dim, n), self.dtype)
            for m, n in self.num_tokens.items()}

  def _tower(self, xs: Tokens, strategy: tuple[str | None, str | None], emit: bool = False
             ) -> tuple[Tokens, list[jax.Array]]:
    """Each modality through its own (or the shared) stack, then all of them through the
    joint stack, each stack closed by its LayerNorm. Returns the outputs per modality and,
    with emit, every layer's output concatenated over the modalities: the input, each
    block's output and the final normalised one."""
    alone, joint = strategy
    layers = [_concat(xs)]
    if alone:
      outs = {m: run_stack(self.stacks[alone.format(m=m)], x, emit) for m, x in xs.items()}
      layers += [jnp.concatenate(per_layer, axis=1)
                 for per_layer in zip(*(ys for _, ys in outs.values()))]
      xs = {m: self._norm(alone.format(m=m), y) for m, (y, _) in outs.items()}
    if joint:
      sizes = [x.shape[1] for x in xs.values()]
      y, ys = run_stack(self.stacks[joint], _concat(xs), emit)
      layers += ys
      y = self._norm(joint, y)
      bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
      xs = {m: y[:, lo:hi] for m, lo, hi in zip(xs, bounds, bounds[1:])}
    layers.append(_concat(xs))
    return xs, layers if emit else []

  def _norm(self, stack: str, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.norms[stack](x.shape[-1]), self.dtype, LN_EPS)

  def embed(self, audio: jax.Array, frames: jax.Array, masks: dict[str, masking.Mask]
            ) -> Tokens:
    """Visible tokens with their position embeddings [B, K, D], of the modalities in `masks`.
    Patches are gathered before the (per-token) embedding, which equals embedding all and
    gathering, as official does."""
    patches, pos = self.patchify(audio, frames), self._pos(self.embed_dim)
    return {m: constrain(self.patch_embed[m](masking.gather_visible(patches[m], mask))
                         + jnp.take(pos[m], mask.ids_keep, axis=0),
                         "batch", "tokens", "act_embed")
            for m, mask in masks.items()}

  def encode(self, xs: Tokens, emit: bool = False) -> tuple[Tokens, list[jax.Array]]:
    """The encoder of `encoder_strategy` on the modalities given (one alone works too)."""
    return self._tower(xs, ENCODERS[self.encoder_strategy], emit)

  def prediction_masks(self, masks: dict[str, masking.Mask]) -> dict[str, jax.Array]:
    """[B, L] per modality: 1 where a prediction counts in the loss. The masked tokens; with
    inpainting, as official, every position after the other modality's visible count
    (predictions there are compared with the target token at the same index)."""
    if not self.use_inpainting:
      return {m: mask.mask for m, mask in masks.items()}
    out = {}
    for m, other in zip(MODALITIES, MODALITIES[::-1]):
      batch, visible = masks[other].ids_keep.shape
      after = jnp.arange(self.num_tokens[m]) >= visible
      out[m] = jnp.broadcast_to(after.astype(jnp.float32), (batch, self.num_tokens[m]))
    return out

  def decode(self, latents: Tokens, masks: dict[str, masking.Mask]) -> Tokens:
    """Predicted patches of every token of each modality from the visible latents."""
    proj = {m: self.decoder_embed[m](x) for m, x in latents.items()}
    pos = self._pos(self.decoder_embed_dim)
    xs = {}
    for m, other in zip(MODALITIES, MODALITIES[::-1]):
      token = self.mask_token[m][0, 0].astype(self.dtype)
      if self.use_inpainting:
        seen = proj[other]
        fill = jnp.broadcast_to(token, (seen.shape[0], self.num_tokens[m] - seen.shape[1],
                                        seen.shape[2]))
        x = jnp.concatenate([seen, fill], axis=1)
      else:
        x = masking.unshuffle_with_mask_tokens(proj[m], token, masks[m])
      xs[m] = x + pos[m]
    xs, _ = self._tower(xs, DECODERS[self.decoder_strategy])
    return {m: self.decoder_pred[m](x) for m, x in xs.items()}

  def hidden_states(self, audio: jax.Array, frames: jax.Array) -> dict[str, list[jax.Array]]:
    """Per-layer tokens [B, L, D] of the unmasked input ("evaluation", as official: no
    masking, no decoder). "audio" / "video": the modality encoded alone; "audio_video":
    both, as in pretraining. Each list: the embeddings, every block's output, the final
    normalised tokens (depth + 2 entries)."""
    batch = audio.shape[0]
    masks = {m: masking.keep_all(batch, n) for m, n in self.num_tokens.items()}
    xs = self.embed(audio, frames, masks)
    return {mode: self.encode({m: xs[m] for m in modalities}, emit=True)[1]
            for mode, modalities in (("audio", "a"), ("video", "v"), ("audio_video", "av"))}

  def features(self, audio: jax.Array, frames: jax.Array) -> dict[str, jax.Array]:
    """Frozen features mean-pooled over tokens: "<mode>" [B, D] (the final layer) and
    "<mode>_layers" [B, depth + 2, D], for the modes of `hidden_states`."""
    out = {}
    for mode, layers in self.hidden_states(audio, frames).items():
      out[f"{mode}_layers"] = jnp.stack([x.astype(jnp.float32).mean(1) for x in layers], axis=1)
      out[mode] = out[f"{mode}_layers"][:, -1]
    return out

  def __call__(self, audio: jax.Array, frames: jax.Array, mask_a: masking.Mask,
               mask_v: masking.Mask) -> Tokens:
    """audio [B, T, F] log-mel, frames [B, T, H, W, 3] in [-1, 1] -> {"latent_<m>": visible
    latents, "pred_<m>": predicted patches of every token}."""
    masks = {"a": mask_a, "v": mask_v}
    latents, _ = self.encode(self.embed(audio, frames, masks))
    preds = self.decode(latents, masks)
    return {**{f"latent_{m}": x for m, x in latents.items()},
            **{f"pred_{m}": x for m, x in preds.items()}}
