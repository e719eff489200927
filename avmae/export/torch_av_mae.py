"""Audiovisual MAE in plain PyTorch (torch only), loading what `python -m avmae.export` writes
for an av_mae training run (`load_state_dict(strict=True)`; the arguments are the export's
`torch_av_mae_args`). The computation mirrors avmae/models/av_mae.py: time-major spectrogram
tokens from a Conv2d over [B, 1, T, F], video tubelets from a Conv3d over [B, 3, T, H, W]
(pixels in [-1, 1]), fixed 1-D sin-cos positions (sin in even channels, cos in odd ones),
pre-norm blocks with LayerNorm eps 1e-6 and tanh GELU, and the encoder and decoder
strategies of the official scenic model. No PyTorch release of AV-MAE exists: this layout is
avmae's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avmae.export.torch_cav_mae import Attention, Mlp, PatchEmbed, _gather

LN_EPS = 1e-6
MODALITIES = ("a", "v")
# strategy -> (stack per modality, "{m}" the modality, or None; joint stack or None)
ENCODERS = {"separate_encoders": ("encoder_{m}", None), "same_encoder": ("encoder", None),
            "concat_and_encode": (None, "encoder"),
            "separate_encoders_and_concat": ("encoder_{m}", "encoder_fusion")}
DECODERS = {"separate_decoders": ("decoder_{m}", None), "same_decoder": ("decoder", None),
            "concat_and_decode": (None, "decoder")}


def sincos_1d_interleaved(dim: int, length: int) -> torch.Tensor:
  rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * -(math.log(10000.0) / dim))
  angle = torch.arange(length, dtype=torch.float64)[:, None] * rate
  out = torch.zeros(length, dim, dtype=torch.float64)
  out[:, 0::2], out[:, 1::2] = angle.sin(), angle.cos()
  return out.float()


class Block(nn.Module):
  """timm's pre-norm ViT block, LayerNorm eps 1e-6 (scenic's and Audio-MAE's); GELU tanh
  (scenic) or exact ("none", Audio-MAE)."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, approximate: str = "tanh"):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate=approximate)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def layer_stacks(encoder_strategy: str, decoder_strategy: str, depth: int, fusion_layers: int,
                 decoder_depth: int) -> dict[str, int]:
  alone, joint = ENCODERS[encoder_strategy]
  fused = fusion_layers if alone and joint else 0
  stacks = {alone.format(m=m): depth - fused for m in MODALITIES} if alone else {}
  if joint:
    stacks[joint] = fused or depth
  alone, joint = DECODERS[decoder_strategy]
  stacks.update({alone.format(m=m): decoder_depth for m in MODALITIES} if alone else {})
  if joint:
    stacks[joint] = decoder_depth
  return stacks


class AVMAE(nn.Module):
  """The pretraining model; `features` gives the frozen probe features."""

  def __init__(self, audio_frames: int, mel_bins: int, image_size: int, patch_size: int,
               num_frames: int, tubelet_size: int, embed_dim: int, depth: int, num_heads: int,
               mlp_ratio: float, decoder_embed_dim: int, decoder_depth: int,
               decoder_num_heads: int, encoder_strategy: str, decoder_strategy: str,
               fusion_layers: int, use_inpainting: bool):
    super().__init__()
    p, d, dd = patch_size, embed_dim, decoder_embed_dim
    self.patch_size, self.use_inpainting = p, use_inpainting
    self.grid_a = (audio_frames // p, mel_bins // p)  # (time, frequency)
    side = image_size // p
    self.num_tokens = {"a": self.grid_a[0] * self.grid_a[1],
                       "v": num_frames // tubelet_size * side * side}
    self.strategies = (ENCODERS[encoder_strategy], DECODERS[decoder_strategy])
    self.patch_embed_a = PatchEmbed(1, d, p)
    self.patch_embed_v = PatchEmbed(3, d, p, tubelet_size)
    for name, n in layer_stacks(encoder_strategy, decoder_strategy, depth, fusion_layers,
                                decoder_depth).items():
      dim, heads = (d, num_heads) if name.startswith("encoder") else (dd, decoder_num_heads)
      self.add_module(name, nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(n)))
      self.add_module(f"{name}_norm", nn.LayerNorm(dim, eps=LN_EPS))
    for m, size in (("a", p * p), ("v", tubelet_size * p * p * 3)):
      self.add_module(f"decoder_embed_{m}", nn.Linear(d, dd))
      self.add_module(f"decoder_pred_{m}", nn.Linear(dd, size))
      self.register_parameter(f"mask_token_{m}", nn.Parameter(torch.zeros(1, 1, dd)))
    self.dims = (d, dd)

  def _pos(self, m: str, dim: int) -> torch.Tensor:
    return sincos_1d_interleaved(dim, self.num_tokens[m])

  def embed(self, audio: torch.Tensor | None, frames: torch.Tensor | None
            ) -> dict[str, torch.Tensor]:
    """All tokens with positions: audio [B, T, F] (a time remainder is dropped), frames
    [B, 3, T, H, W] in [-1, 1]."""
    t, f = self.grid_a
    p, d = self.patch_size, self.dims[0]
    out = {}
    if audio is not None:
      out["a"] = self.patch_embed_a(audio[:, None, :t * p, :f * p]) + self._pos("a", d)
    if frames is not None:
      out["v"] = self.patch_embed_v(frames) + self._pos("v", d)
    return out

  def _tower(self, xs: dict[str, torch.Tensor], strategy) -> tuple[dict, list]:
    """As AVMAE._tower of avmae/models/av_mae.py: outputs per modality and every layer's
    output concatenated over the modalities (input, blocks, final normalised)."""
    alone, joint = strategy
    layers = [torch.cat(list(xs.values()), dim=1)]
    if alone:
      per, normed = {}, {}
      for m, x in xs.items():
        name, ys = alone.format(m=m), []
        for block in getattr(self, name):
          x = block(x)
          ys.append(x)
        per[m], normed[m] = ys, getattr(self, f"{name}_norm")(x)
      layers += [torch.cat(group, dim=1) for group in zip(*per.values())]
      xs = normed
    if joint:
      sizes = [x.shape[1] for x in xs.values()]
      y = torch.cat(list(xs.values()), dim=1)
      for block in getattr(self, joint):
        y = block(y)
        layers.append(y)
      xs = dict(zip(xs, getattr(self, f"{joint}_norm")(y).split(sizes, dim=1)))
    layers.append(torch.cat(list(xs.values()), dim=1))
    return xs, layers

  def hidden_states(self, audio: torch.Tensor | None = None, frames: torch.Tensor | None = None
                    ) -> dict[str, list[torch.Tensor]]:
    """Per-layer tokens [B, L, D] of the whole input: `audio_feats` and `video_feats` (each
    modality encoded alone), `fusion_feats` (both; needs both inputs)."""
    xs = self.embed(audio, frames)
    out = {f"{name}_feats": self._tower({m: xs[m]}, self.strategies[0])[1]
           for m, name in (("a", "audio"), ("v", "video")) if m in xs}
    if len(xs) == 2:
      out["fusion_feats"] = self._tower(xs, self.strategies[0])[1]
    return out

  def features(self, audio: torch.Tensor, frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean-pooled final features "audio", "video", "audio_video" [B, D], as avmae's probe."""
    states = self.hidden_states(audio, frames)
    return {mode: states[key][-1].mean(1) for mode, key in
            (("audio", "audio_feats"), ("video", "video_feats"), ("audio_video", "fusion_feats"))}

  def forward(self, audio: torch.Tensor, frames: torch.Tensor, ids_keep_a: torch.Tensor,
              ids_restore_a: torch.Tensor, ids_keep_v: torch.Tensor,
              ids_restore_v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pretraining forward with given masks (ids_keep [B, K] visible tokens in shuffled
    order, ids_restore [B, L] its inverse): visible latents and predictions of every token."""
    xs = self.embed(audio, frames)
    keep, restore = {"a": ids_keep_a, "v": ids_keep_v}, {"a": ids_restore_a, "v": ids_restore_v}
    latents, _ = self._tower({m: _gather(x, keep[m]) for m, x in xs.items()},
                             self.strategies[0])
    proj = {m: getattr(self, f"decoder_embed_{m}")(x) for m, x in latents.items()}
    dd = self.dims[1]
    decoder_in = {}
    for m, other in zip(MODALITIES, MODALITIES[::-1]):
      token = getattr(self, f"mask_token_{m}")
      if self.use_inpainting:  # the other modality's visible tokens, then m's mask tokens
        seen = proj[other]
        fill = token.expand(seen.shape[0], self.num_tokens[m] - seen.shape[1], -1)
        x = torch.cat([seen, fill], dim=1)
      else:
        fill = token.expand(proj[m].shape[0], self.num_tokens[m] - proj[m].shape[1], -1)
        x = _gather(torch.cat([proj[m], fill], dim=1), restore[m])
      decoder_in[m] = x + self._pos(m, dd)
    decoded, _ = self._tower(decoder_in, self.strategies[1])
    return {**{f"latent_{m}": x for m, x in latents.items()},
            **{f"pred_{m}": getattr(self, f"decoder_pred_{m}")(x) for m, x in decoded.items()}}
