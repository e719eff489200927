"""CAV-MAE in plain PyTorch (torch only: no timm, no JAX), loading avmae's exported weights.

The parameter names, order and shapes are the official CAV-MAE state_dict's, so
`load_state_dict(strict=True)` takes what `python -m avmae.export --format=cav_mae` writes:
the pretraining model (`decoder=True`), the finetuning model (`decoder=False,
num_classes=N`) and the audio-only finetuning model (`video=False`). The computation mirrors
avmae/models/cav_mae.py: frequency-major audio tokens, 16x16 (`patch_size`) convolutions,
fixed sin-cos position embeddings, blocks with three LayerNorm pairs (eps 1e-5), exact GELU.

`pretraining_loss` is the official objective (per-patch-normalised MSE on masked patches plus
InfoNCE at temperature 0.05 over the batch), so the module also trains: the peer of
experiments/benchmarks/vs_torch.py.

`hidden_states` gives what AV-SUPERB's upstream interface expects: lists of [B, T, D], one per
layer, under `audio_feats`, `video_feats` and `fusion_feats`.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

LN_EPS = 1e-5


def sincos_1d(embed_dim: int, length: int) -> torch.Tensor:
  """[length, embed_dim]: [sin, cos] of position * 10000^(-k / (D/2))."""
  omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
  out = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
  return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
  """[grid_h * grid_w, embed_dim]: first half of the channels encodes the column, second the
  row; each half [sin, cos] of position * 10000^(-k / (D/4)) (the MAE construction)."""
  by_w = sincos_1d(embed_dim // 2, grid_w).repeat(grid_h, 1)
  by_h = sincos_1d(embed_dim // 2, grid_h).repeat_interleave(grid_w, dim=0)
  return torch.cat([by_w, by_h], dim=1)


def video_pos_embedding(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
  """Video tokens on (time slots, rows, columns): the 2-D embedding for one slot, else 3-D
  (D/4 channels of the time slot, then 3D/4 of the 2-D embedding), as avmae's model."""
  t, h, w = grid
  if t == 1:
    return sincos_2d(dim, h, w)
  return torch.cat([sincos_1d(dim // 4, t).repeat_interleave(h * w, dim=0),
                    sincos_2d(dim // 4 * 3, h, w).repeat(t, 1)], dim=1)


class PatchEmbed(nn.Module):
  def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int = 0):
    super().__init__()
    if tubelet_size:  # clips: tubelets of tubelet_size frames x patch x patch
      size = (tubelet_size, patch_size, patch_size)
      self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=size, stride=size)
    else:
      self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), D], row-major tokens; a clip [B, C, T, H, W] ->
    [B, (T/t)*(H/p)*(W/p), D], time-major."""
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, dim * 3)  # output rows [3][heads][head_dim]
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(
        2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5
    return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int, approximate: str = "none"):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU(approximate=approximate)  # "none": exact (erf), CAV-MAE's
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """Pre-norm block with shared (`norm1`/`norm2`) and per-modality (`_a`, `_v`) norms."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
    super().__init__()
    # Registration order is the official state_dict order.
    self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.norm1_a = nn.LayerNorm(dim, eps=LN_EPS)
    self.norm1_v = nn.LayerNorm(dim, eps=LN_EPS)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.norm2_a = nn.LayerNorm(dim, eps=LN_EPS)
    self.norm2_v = nn.LayerNorm(dim, eps=LN_EPS)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
    suffix = "" if modality is None else f"_{modality}"
    x = x + self.attn(getattr(self, "norm1" + suffix)(x))
    return x + self.mlp(getattr(self, "norm2" + suffix)(x))


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
  return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))


class CAVMAE(nn.Module):
  """CAV-MAE encoders (+ decoder, + classification head). Inputs as avmae's model takes
  them after preprocessing: audio [B, T, F] normalised log-mel, frames [B, 3, H, W] (clips of
  `num_frames` > 1: [B, 3, T, H, W], cut into tubelets of `tubelet_size` frames) normalised
  with the ImageNet statistics (see torch_frontend.py)."""

  def __init__(self, audio_frames: int = 1024, mel_bins: int = 128, image_size: int = 224,
               patch_size: int = 16, embed_dim: int = 768, modality_specific_depth: int = 11,
               shared_depth: int = 1, num_heads: int = 12, mlp_ratio: float = 4.0,
               decoder_embed_dim: int = 512, decoder_depth: int = 8,
               decoder_num_heads: int = 16, decoder: bool = True, video: bool = True,
               num_classes: int = 0, num_frames: int = 1, tubelet_size: int = 1):
    super().__init__()
    if decoder and (not video or num_classes):
      raise ValueError("the pretraining layout (decoder=True) has both modalities and no head")
    self.patch_size = patch_size
    self.grid_a = (mel_bins // patch_size, audio_frames // patch_size)  # (freq, time)
    side = image_size // patch_size
    self.num_frames = num_frames
    self.grid_v = (num_frames // tubelet_size, side, side)  # (time slots, rows, columns)
    d, dd = embed_dim, decoder_embed_dim

    def constant(value: torch.Tensor) -> nn.Parameter:
      return nn.Parameter(value[None], requires_grad=False)  # frozen, as official pretraining

    # Parameters first, in the official order; then the submodules.
    self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
    if video:
      self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed_a = constant(sincos_2d(d, *self.grid_a))
    if video:
      self.pos_embed_v = constant(video_pos_embedding(self.grid_v, d))
    if decoder:
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
      self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, dd))
      self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, dd))
      self.decoder_pos_embed_a = constant(sincos_2d(dd, *self.grid_a))
      self.decoder_pos_embed_v = constant(video_pos_embedding(self.grid_v, dd))
    self.patch_embed_a = PatchEmbed(1, d, patch_size)
    if video:
      self.patch_embed_v = PatchEmbed(3, d, patch_size, tubelet_size if num_frames > 1 else 0)

    def blocks(depth: int, dim: int, heads: int) -> nn.ModuleList:
      return nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))

    self.blocks_a = blocks(modality_specific_depth, d, num_heads)
    if video:
      self.blocks_v = blocks(modality_specific_depth, d, num_heads)
    self.blocks_u = blocks(shared_depth, d, num_heads)
    self.norm_a = nn.LayerNorm(d, eps=LN_EPS)
    if video:
      self.norm_v = nn.LayerNorm(d, eps=LN_EPS)
    self.norm = nn.LayerNorm(d, eps=LN_EPS)
    if decoder:
      self.decoder_embed = nn.Linear(d, dd)
      self.decoder_blocks = blocks(decoder_depth, dd, decoder_num_heads)
      self.decoder_norm = nn.LayerNorm(dd, eps=LN_EPS)
      self.decoder_pred_a = nn.Linear(dd, patch_size ** 2)
      self.decoder_pred_v = nn.Linear(dd, tubelet_size * patch_size ** 2 * 3)
    if num_classes:
      self.mlp_head = nn.Sequential(nn.LayerNorm(d, eps=LN_EPS), nn.Linear(d, num_classes))

  # --- encoders --------------------------------------------------------------------------
  def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
    """[B, T, F] -> [B, (F/p)*(T/p), D]: fed transposed ([B, 1, F, T]) as official, so
    tokens are frequency-major."""
    x = self.patch_embed_a(audio.unsqueeze(1).transpose(2, 3))
    return x + self.pos_embed_a + self.modality_a

  def embed_video(self, frames: torch.Tensor) -> torch.Tensor:
    return self.patch_embed_v(frames) + self.pos_embed_v + self.modality_v

  def _shared(self, x: torch.Tensor, modality: str | None) -> torch.Tensor:
    for block in self.blocks_u:
      x = block(x, modality)
    return x

  def forward_encoder(self, audio: torch.Tensor, frames: torch.Tensor,
                      ids_keep_a: torch.Tensor | None = None,
                      ids_keep_v: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Joint latent (`latent`, final `norm`) and per-modality latents (`latent_a`,
    `latent_v`: shared block with the modality's norms, then norm_a / norm_v) of the visible
    tokens `ids_keep_*` [B, K] (None: all)."""
    a, v = self.embed_audio(audio), self.embed_video(frames)
    if ids_keep_a is not None:
      a = _gather(a, ids_keep_a)
    if ids_keep_v is not None:
      v = _gather(v, ids_keep_v)
    for block in self.blocks_a:
      a = block(a)
    for block in self.blocks_v:
      v = block(v)
    return {"latent": self.norm(self._shared(torch.cat([a, v], dim=1), None)),
            "latent_a": self.norm_a(self._shared(a, "a")),
            "latent_v": self.norm_v(self._shared(v, "v"))}

  def hidden_states(self, audio: torch.Tensor | None = None, frames: torch.Tensor | None = None
                    ) -> dict[str, list[torch.Tensor]]:
    """Per-layer tokens of the whole input, each [B, T, D]: `audio_feats` / `video_feats`
    (the embeddings, every modality block's output, and the final features: the shared
    block with the modality's norms, then norm_a / norm_v), and `fusion_feats` (both
    concatenated per layer, last the shared block on both, then `norm`; needs both inputs)."""
    out: dict[str, list[torch.Tensor]] = {}
    if audio is not None:
      a = [self.embed_audio(audio)]
      for block in self.blocks_a:
        a.append(block(a[-1]))
      out["audio_feats"] = a + [self.norm_a(self._shared(a[-1], "a"))]
    if frames is not None:
      v = [self.embed_video(frames)]
      for block in self.blocks_v:
        v.append(block(v[-1]))
      out["video_feats"] = v + [self.norm_v(self._shared(v[-1], "v"))]
    if audio is not None and frames is not None:
      joint = [torch.cat([x, y], dim=1) for x, y in zip(a, v)]
      out["fusion_feats"] = joint + [self.norm(self._shared(joint[-1], None))]
    return out

  def classify(self, audio: torch.Tensor | None, frames: torch.Tensor | None,
               mode: str = "multimodal") -> torch.Tensor:
    """Logits of the finetuning head on the mean-pooled final features, as the official
    finetuning model's modes: "multimodal" (joint), "audioonly", "videoonly"."""
    key = {"multimodal": "fusion_feats", "audioonly": "audio_feats",
           "videoonly": "video_feats"}[mode]
    return self.mlp_head(self.hidden_states(audio, frames)[key][-1].mean(1))

  # --- decoder ---------------------------------------------------------------------------
  def forward_decoder(self, latent: torch.Tensor, num_visible_a: int,
                      ids_restore_a: torch.Tensor, ids_restore_v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted patches of every token: [B, La, p*p] (freq, time offsets) and
    [B, Lv, p*p*3] (row, col, channel), from the visible latent [B, Ka + Kv, D] (the first
    `num_visible_a` audio); mask tokens are appended per modality and unshuffled."""
    x = self.decoder_embed(latent)
    parts = []
    for part, ids in ((x[:, :num_visible_a], ids_restore_a),
                      (x[:, num_visible_a:], ids_restore_v)):
      fill = self.mask_token.expand(x.shape[0], ids.shape[1] - part.shape[1], -1)
      parts.append(_gather(torch.cat([part, fill], dim=1), ids))
    a = parts[0] + self.decoder_pos_embed_a + self.decoder_modality_a
    v = parts[1] + self.decoder_pos_embed_v + self.decoder_modality_v
    x = torch.cat([a, v], dim=1)
    for block in self.decoder_blocks:
      x = block(x)
    x = self.decoder_norm(x)
    num_a = ids_restore_a.shape[1]
    return self.decoder_pred_a(x[:, :num_a]), self.decoder_pred_v(x[:, num_a:])

  def forward(self, audio: torch.Tensor, frames: torch.Tensor, ids_keep_a: torch.Tensor,
              ids_restore_a: torch.Tensor, ids_keep_v: torch.Tensor,
              ids_restore_v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pretraining forward with given masks: latents, predictions, and the
    L2-normalised contrastive embeddings (mean of the visible per-modality latents)."""
    out = self.forward_encoder(audio, frames, ids_keep_a, ids_keep_v)
    out["pred_a"], out["pred_v"] = self.forward_decoder(
        out["latent"], ids_keep_a.shape[1], ids_restore_a, ids_restore_v)
    out["embedding_a"] = F.normalize(out["latent_a"].mean(1), dim=-1)
    out["embedding_v"] = F.normalize(out["latent_v"].mean(1), dim=-1)
    return out


# --- pretraining objective ---------------------------------------------------------------
def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
  """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], as official (nchpwq->nhwpqc)."""
  b, c, hh, ww = x.shape
  h, w = hh // patch, ww // patch
  x = torch.einsum("nchpwq->nhwpqc", x.reshape(b, c, h, patch, w, patch))
  return x.reshape(b, h * w, patch * patch * c)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        norm_pix: bool) -> torch.Tensor:
  """Mean over masked patches (mask 1) of the per-patch MSE; norm_pix: each target patch
  normalised by its mean and unbiased variance, as official."""
  if norm_pix:
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
  return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def contrastive_loss(audio_rep: torch.Tensor, video_rep: torch.Tensor, temperature: float,
                     bidirectional: bool) -> tuple[torch.Tensor, torch.Tensor]:
  """Official forward_contrastive: softmax over the audio axis, positives on the diagonal."""
  logits = F.normalize(audio_rep, dim=-1) @ F.normalize(video_rep, dim=-1).t() / temperature
  own = torch.arange(logits.shape[0], device=logits.device)
  nce = -torch.diag(F.log_softmax(logits, dim=0)).mean()
  accuracy = (logits.argmax(0) == own).float().mean()
  if bidirectional:
    nce = (nce - torch.diag(F.log_softmax(logits.t(), dim=0)).mean()) / 2
    accuracy = (accuracy + (logits.t().argmax(0) == own).float().mean()) / 2
  return nce, accuracy


def pretraining_loss(model: CAVMAE, audio: torch.Tensor, frames: torch.Tensor,
                     masks: tuple[torch.Tensor, ...], mae_weight: float,
                     contrastive_weight: float, temperature: float, bidirectional: bool,
                     norm_pix: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """The CAV-MAE loss for given masks (ids_keep_a, ids_restore_a, mask_a, ids_keep_v,
  ids_restore_v, mask_v; mask 1 = removed). Audio [B, T, F], frames [B, 3, H, W]."""
  if model.num_frames > 1:
    raise ValueError("pretraining_loss is CAV-MAE's one-frame objective; this model takes "
                     f"clips of {model.num_frames} frames")
  keep_a, restore_a, mask_a, keep_v, restore_v, mask_v = masks
  out = model(audio, frames, keep_a, restore_a, keep_v, restore_v)
  p = model.patch_size
  rec_a = reconstruction_loss(out["pred_a"], patchify(audio.unsqueeze(1).transpose(2, 3), p),
                              mask_a, norm_pix)
  rec_v = reconstruction_loss(out["pred_v"], patchify(frames, p), mask_v, norm_pix)
  nce, accuracy = contrastive_loss(out["latent_a"].mean(1), out["latent_v"].mean(1),
                                   temperature, bidirectional)
  loss = mae_weight * (rec_a + rec_v) + contrastive_weight * nce
  return loss, {"loss_mae_a": rec_a, "loss_mae_v": rec_v, "nce": nce,
                "contrastive_accuracy": accuracy}
