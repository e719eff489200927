"""Analytic FLOP counts (matmuls only, 2 FLOPs per multiply-add), for throughput and MFU.

Training costs 3x the forward pass (forward, and the backward's two matmuls per forward
matmul). Elementwise work (LayerNorm, softmax, GELU) is not counted: XLA's cost analysis
counts it, so the two differ by a few percent, not by the masked tokens.
"""

from __future__ import annotations

import ml_collections

from avmae import masking
from avmae.models import av_mae


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
  """One transformer block on `tokens` tokens: qkv, QK^T, AV, output projection, MLP."""
  mlp = int(width * mlp_ratio)
  projections = 2 * tokens * width * (3 * width + width + 2 * mlp)
  attention = 2 * 2 * tokens * tokens * width
  return float(projections + attention)


def cav_mae_forward_flops(model: ml_collections.ConfigDict,
                          mask: ml_collections.ConfigDict) -> float:
  """FLOPs of one example's forward pass of the CAV-MAE pretraining model."""
  p, d, dd = model.patch_size, model.embed_dim, model.decoder_embed_dim
  tokens_a = (model.mel_bins // p) * (model.audio_frames // p)
  slots, per_slot = model.num_frames // model.tubelet_size, (model.image_size // p) ** 2
  tokens_v, values_v = slots * per_slot, model.tubelet_size * p * p * 3
  keep_a = masking.num_visible(tokens_a, mask.ratio_a)
  keep_v = (masking.num_visible_tube((slots, per_slot), mask.ratio_v) if mask.mode_v == "tube"
            else masking.num_visible(tokens_v, mask.ratio_v))
  blocks = lambda n, width: block_flops(n, width, model.mlp_ratio)
  patch_embed = 2 * (keep_a * p * p + keep_v * values_v) * d
  encoder = model.modality_specific_depth * (blocks(keep_a, d) + blocks(keep_v, d))
  # The shared blocks run three times: on both modalities, then on each alone.
  shared = model.shared_depth * (blocks(keep_a + keep_v, d) + blocks(keep_a, d)
                                 + blocks(keep_v, d))
  decoder_embed = 2 * (keep_a + keep_v) * d * dd
  decoder = model.decoder_depth * blocks(tokens_a + tokens_v, dd)
  heads = 2 * (tokens_a * p * p + tokens_v * values_v) * dd
  return float(patch_embed + encoder + shared + decoder_embed + decoder + heads)


def cav_mae_train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step on the global batch (forward + backward)."""
  batch = config.data.batch_size
  contrastive = 2 * batch * batch * config.model.embed_dim  # similarity matrix
  return 3.0 * (batch * cav_mae_forward_flops(config.model, config.masking) + contrastive)


def av_mae_forward_flops(model: ml_collections.ConfigDict,
                         mask: ml_collections.ConfigDict) -> float:
  """FLOPs of one example's forward pass of the Audiovisual MAE pretraining model: each
  stack of its encoder and decoder strategies (avmae/models/av_mae.py) on its tokens."""
  p, d, dd = model.patch_size, model.embed_dim, model.decoder_embed_dim
  tokens = {"a": (model.audio_frames // p) * (model.mel_bins // p),
            "v": (model.num_frames // model.tubelet_size) * (model.image_size // p) ** 2}
  values = {"a": p * p, "v": model.tubelet_size * p * p * 3}
  keep = {"a": av_mae.num_visible(tokens["a"], mask.ratio_a),
          "v": av_mae.num_visible(tokens["v"], mask.ratio_v, mask.mode_v,
                                  model.num_frames // model.tubelet_size)}
  blocks = lambda n, width: block_flops(n, width, model.mlp_ratio)
  stacks = av_mae.layer_stacks(model)

  def tower(strategy, counts, width):
    alone, joint = strategy
    total = sum(stacks[alone.format(m=m)] * blocks(n, width) for m, n in counts.items()
                ) if alone else 0.0
    return total + (stacks[joint] * blocks(sum(counts.values()), width) if joint else 0.0)

  encoder = tower(av_mae.ENCODERS[model.encoder_strategy], keep, d)
  decoder = tower(av_mae.DECODERS[model.decoder_strategy], tokens, dd)
  embeds = sum(2 * keep[m] * (values[m] * d + d * dd) + 2 * tokens[m] * dd * values[m]
               for m in tokens)  # patch embedding, decoder projection, output head
  return float(encoder + decoder + embeds)


def window_block_flops(tokens: int, width: int, mlp_ratio: float, window_area: int) -> float:
  """One Swin block: `block_flops` with each token attending to its window's tokens only."""
  mlp = int(width * mlp_ratio)
  return float(2 * tokens * width * (4 * width + 2 * mlp) + 2 * 2 * tokens * window_area * width)


def audio_mae_forward_flops(model: ml_collections.ConfigDict,
                            mask: ml_collections.ConfigDict) -> float:
  """FLOPs of one example's forward pass of the Audio-MAE pretraining model (the Swin
  decoder's relative position bias MLP is batch-independent and not counted)."""
  p, d, dd = model.patch_size, model.embed_dim, model.decoder_embed_dim
  t, f = model.audio_frames // p, model.mel_bins // p
  tokens = t * f
  keep = (int(t * (1 - mask.mask_t_prob)) * int(f * (1 - mask.mask_f_prob))
          if mask.mode == "time_freq" else masking.num_visible(tokens, mask.ratio))
  encoder = model.depth * block_flops(keep + 1, d, model.mlp_ratio)  # + the cls token
  if model.decoder_mode == 1:
    window = min(4, t) * min(4, f)
    decoded = tokens  # the cls token is dropped before the Swin blocks
    decoder = model.swin_depth * window_block_flops(tokens, dd, model.mlp_ratio, window)
  else:
    decoded = tokens + 1
    decoder = model.decoder_depth * block_flops(decoded, dd, model.mlp_ratio)
  embeds = 2 * keep * p * p * d + 2 * (keep + 1) * d * dd + 2 * decoded * dd * p * p
  return float(encoder + decoder + embeds)


# ----------------------------------------------------------------------------- peak FLOP/s
# Dense peak FLOP/s per device by `device_kind` (bfloat16 matmuls, vendors' figures; a TPU
# device is one chip: v4 and v5p in megacore mode), for MFU = achieved / peak. Looked up by
# the longest matching prefix of the kind, case-insensitive.
PEAK_FLOPS_PER_DEVICE = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,   # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,        # v5p (its device_kind is "TPU v5")
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,   # v6e (Trillium)
    "tpu v6e": 918e12,
    "nvidia h100 pcie": 756e12,
    "nvidia h100": 989e12,   # SXM (device_kind "NVIDIA H100 80GB HBM3")
    "nvidia h200": 989e12,   # H100's compute with more memory
    "nvidia a100": 312e12,
}
# CPU: not a vendor figure but measured: float32 2048^3 matmuls in JAX on this project's
# 2-core development machine, 414 GFLOP/s (docs/speed.md). It is the whole machine's: the
# simulated CPU devices of one process share its cores, so it counts once per process.
CPU_PEAK_FLOPS_PER_PROCESS = 414e9


def peak_flops_per_device(device_kind: str) -> float | None:
  """The table's peak for a device kind; None when the kind is not in it."""
  kind = device_kind.lower()
  matches = [k for k in PEAK_FLOPS_PER_DEVICE if kind.startswith(k)]
  return PEAK_FLOPS_PER_DEVICE[max(matches, key=len)] if matches else None


def peak_flops(devices) -> float | None:
  """Peak FLOP/s of all `devices` together (None: a device kind without a figure)."""
  devices = list(devices)
  if all(d.platform == "cpu" for d in devices):
    return CPU_PEAK_FLOPS_PER_PROCESS * len({d.process_index for d in devices})
  peaks = [peak_flops_per_device(d.device_kind) for d in devices]
  return None if None in peaks else float(sum(peaks))
