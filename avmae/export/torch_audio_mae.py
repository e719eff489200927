"""Audio-MAE in plain PyTorch (torch only: no timm, no JAX), with the official
`MaskedAutoencoderViT` state_dict layout (facebookresearch/AudioMAE models_mae.py,
audio_exp=True, in_chans=1): `load_state_dict(strict=True)` takes what `python -m avmae.export
--format=audio_mae` writes, and official checkpoints (their "model" entry) load into it.

The computation mirrors the official model and avmae/models/audio_mae.py: time-major tokens
from a Conv2d over [B, 1, T, F], the swapped-grid 2-D sin-cos position embeddings, a cls token
after masking, pre-norm ViT blocks (LayerNorm eps 1e-6, exact GELU), and the decoder: 16
Swin-v2 style blocks (post-norm, cosine attention over a learned temperature, continuous
relative position bias, 4 x 4 windows, odd blocks shifted by (2, 0)) or, with decoder_mode 0,
global ViT blocks. Masks come from outside (ids_keep, ids_restore), as in the JAX model.
"""

from __future__ import annotations

import torch
from torch import nn

from avmae.export.torch_av_mae import Block
from avmae.export.torch_cav_mae import Mlp, PatchEmbed, _gather, sincos_2d

LN_EPS = 1e-6
WINDOW, SHIFT, BIAS_HIDDEN, MASKED = (4, 4), (2, 0), 384, -100.0


def pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
  """[1 + T*F, dim]: a zero row (cls), then official's embedding of the (T, F) grid given
  as (F, T): token i encodes i mod T and i div T."""
  t, f = grid
  return torch.cat([torch.zeros(1, dim), sincos_2d(dim, f, t)])


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
  """[B, H, W, C] -> [B * windows, wh * ww, C]."""
  b, h, w, c = x.shape
  x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_reverse(x: torch.Tensor, window: tuple[int, int], grid: tuple[int, int]
                   ) -> torch.Tensor:
  h, w = grid
  x = x.view(-1, h // window[0], w // window[1], window[0], window[1], x.shape[-1])
  return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, x.shape[-1])


class MetaMlp(nn.Module):
  """The relative position bias network: Linear, ReLU, dropout, Linear, dropout."""

  def __init__(self, hidden: int, out: int, drop: float):
    super().__init__()
    self.fc1 = nn.Linear(2, hidden)
    self.act = nn.ReLU()
    self.drop1 = nn.Dropout(drop)
    self.fc2 = nn.Linear(hidden, out)
    self.drop2 = nn.Dropout(drop)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
  def __init__(self, dim: int, num_heads: int, window: tuple[int, int], drop: float):
    super().__init__()
    self.num_heads, self.window = num_heads, window
    self.qkv = nn.Linear(dim, dim * 3)
    self.proj = nn.Linear(dim, dim)
    self.meta_mlp = MetaMlp(BIAS_HIDDEN, num_heads, drop)
    self.tau = nn.Parameter(torch.ones(num_heads))  # a direct parameter: first in state_dict
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).float()
    self.register_buffer("relative_coords_log", rel.sign() * torch.log1p(rel.abs()),
                         persistent=False)

  def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    bw, n, c = x.shape
    q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(
        2, 0, 3, 1, 4)
    denom = torch.norm(q, dim=-1, keepdim=True) @ torch.norm(k, dim=-1, keepdim=True).transpose(
        -2, -1)
    attn = q @ k.transpose(-2, -1) / denom.clamp(min=1e-6)
    attn = attn / self.tau.clamp(min=0.01).view(1, -1, 1, 1)
    bias = self.meta_mlp(self.relative_coords_log).transpose(0, 1).view(self.num_heads, n, n)
    attn = attn + bias[None]
    if mask is not None:
      windows = mask.shape[0]
      attn = (attn.view(bw // windows, windows, self.num_heads, n, n)
              + mask[None, :, None]).view(bw, self.num_heads, n, n)
    y = attn.softmax(dim=-1) @ v
    return self.proj(y.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
  def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], shift: tuple[int, int],
               mlp_ratio: float, drop: float = 0.1):
    super().__init__()
    self.grid = grid
    self.window = tuple(min(g, w) for g, w in zip(grid, WINDOW))
    self.shift = tuple(0 if g <= w else s for g, w, s in zip(grid, self.window, shift))
    self.attn = WindowAttention(dim, num_heads, self.window, drop)
    self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.register_buffer("attn_mask", self._region_mask(), persistent=False)

  def _region_mask(self) -> torch.Tensor | None:
    if not any(self.shift):
      return None
    (wh, ww), (sh, sw) = self.window, self.shift
    regions = torch.zeros(1, *self.grid, 1)
    count = 0
    for rows in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
      for cols in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
        regions[:, rows, cols, :] = count
        count += 1
    labels = window_partition(regions, self.window)[..., 0]
    diff = labels[:, None, :] - labels[:, :, None]
    return torch.where(diff != 0, torch.tensor(MASKED), torch.tensor(0.0))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    y = x.view(b, *self.grid, c)
    if any(self.shift):
      y = torch.roll(y, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
    y = self.attn(window_partition(y, self.window), self.attn_mask)
    y = window_reverse(y, self.window, self.grid)
    if any(self.shift):
      y = torch.roll(y, shifts=self.shift, dims=(1, 2))
    x = x + self.norm1(y.reshape(b, n, c))
    return x + self.norm2(self.mlp(x))


class AudioMAE(nn.Module):
  """Audio-MAE's pretraining model. Input: audio [B, T, F], the normalised log-mel."""

  def __init__(self, audio_frames: int = 1024, mel_bins: int = 128, patch_size: int = 16,
               embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
               mlp_ratio: float = 4.0, decoder_embed_dim: int = 512, decoder_depth: int = 8,
               decoder_num_heads: int = 16, decoder_mode: int = 1, swin_depth: int = 16,
               swin_heads: int = 16):
    super().__init__()
    self.patch_size, self.decoder_mode = patch_size, decoder_mode
    self.grid = (audio_frames // patch_size, mel_bins // patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(pos_embed(embed_dim, self.grid)[None], requires_grad=False)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(pos_embed(decoder_embed_dim, self.grid)[None],
                                          requires_grad=False)
    self.patch_embed = PatchEmbed(1, embed_dim, patch_size)
    self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, approximate="none")
                                for _ in range(depth))
    self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    if decoder_mode == 1:
      self.decoder_blocks = nn.ModuleList(
          SwinBlock(decoder_embed_dim, swin_heads, self.grid, SHIFT if i % 2 else (0, 0),
                    mlp_ratio) for i in range(swin_depth))
    else:
      self.decoder_blocks = nn.ModuleList(
          Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, approximate="none")
          for _ in range(decoder_depth))
    self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2)

  def embed(self, audio: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1 + K, D]: cls, then the tokens `ids_keep` (all, in order, by default)."""
    x = self.patch_embed(audio[:, None]) + self.pos_embed[:, 1:]
    if ids_keep is not None:
      x = _gather(x, ids_keep)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)

  def forward_encoder(self, audio: torch.Tensor, ids_keep: torch.Tensor | None = None
                      ) -> torch.Tensor:
    x = self.embed(audio, ids_keep)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    x = self.decoder_embed(latent)
    fill = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
    x = torch.cat([x[:, :1], _gather(torch.cat([x[:, 1:], fill], dim=1), ids_restore)], dim=1)
    x = x + self.decoder_pos_embed
    if self.decoder_mode == 1:
      x = x[:, 1:]
    for block in self.decoder_blocks:
      x = block(x)
    pred = self.decoder_pred(self.decoder_norm(x))
    return pred if self.decoder_mode == 1 else pred[:, 1:]

  def forward(self, audio: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor
              ) -> dict[str, torch.Tensor]:
    latent = self.forward_encoder(audio, ids_keep)
    return {"latent": latent, "pred": self.forward_decoder(latent, ids_restore)}

  def hidden_states(self, audio: torch.Tensor) -> list[torch.Tensor]:
    """[B, 1 + L, D] per layer of the unmasked input: the embeddings, each block's output and
    the final normalised tokens."""
    x = self.embed(audio)
    layers = [x]
    for block in self.blocks:
      x = block(x)
      layers.append(x)
    return layers + [self.norm(x)]

  def features(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means over the patch tokens (cls excluded): "audio" of the final normalised tokens,
    "audio_layers" [B, depth + 2, D] of every layer."""
    layers = torch.stack([x[:, 1:].mean(1) for x in self.hidden_states(audio)], dim=1)
    return {"audio": layers[:, -1], "audio_layers": layers}


def patchify(audio: torch.Tensor, patch: int) -> torch.Tensor:
  """[B, T, F] -> [B, L, p*p]: time-major tokens, values (time, frequency) (official's)."""
  b, t, f = audio.shape
  x = audio.reshape(b, t // patch, patch, f // patch, patch).permute(0, 1, 3, 2, 4)
  return x.reshape(b, (t // patch) * (f // patch), patch * patch)


def pretraining_loss(model: AudioMAE, audio: torch.Tensor, ids_keep: torch.Tensor,
                     ids_restore: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """Official `forward_loss` with norm_pix_loss: per-patch normalised target (unbiased
  variance, eps 1e-6), the per-patch MSE averaged over the masked patches."""
  pred = model(audio, ids_keep, ids_restore)["pred"]
  target = patchify(audio, model.patch_size)
  target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
  loss = ((pred - target) ** 2).mean(-1)
  return (loss * mask).sum() / mask.sum()
