"""avmae's input preprocessing in PyTorch (torch only), for the exported models.

- `kaldi_fbank`: the Kaldi fbank of avmae/data/features.py (torchaudio.compliance.kaldi's
  options and defaults, float64 inside), waveform mean removed first as data_prep does;
- `prepare_audio`: crop or zero-pad to the model's frames, normalise with the dataset's
  log-mel mean/std (as avmae's input pipeline);
- `prepare_frames`: uint8 frames [N, H, W, 3] -> bilinear resize to the model's size, rounded
  back to uint8 as the pipeline does, normalised with the ImageNet statistics -> [N, 3, S, S].
The values come from the `preprocessing` entry of the export's `<file>.json`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

_LOG_FLOOR = torch.finfo(torch.float32).eps
_WINDOWS = {
    "hanning": lambda a, c: 0.5 - 0.5 * torch.cos(a),
    "povey": lambda a, c: (0.5 - 0.5 * torch.cos(a)) ** 0.85,
    "hamming": lambda a, c: 0.54 - 0.46 * torch.cos(a),
    "rectangular": lambda a, c: torch.ones_like(a),
    "blackman": lambda a, c: c - 0.5 * torch.cos(a) + (0.5 - c) * torch.cos(2 * a),
}


def _mel(f: torch.Tensor) -> torch.Tensor:
  return 1127.0 * torch.log1p(f / 700.0)


def _mel_matrix(num_mel_bins: int, nfft: int, sample_rate: int, low_freq: float,
                high_freq: float) -> torch.Tensor:
  """Kaldi's triangular filters [nfft//2 + 1, num_mel_bins] (no weight on the Nyquist bin)."""
  edges = torch.linspace(float(_mel(torch.tensor(low_freq, dtype=torch.float64))),
                         float(_mel(torch.tensor(high_freq, dtype=torch.float64))),
                         num_mel_bins + 2, dtype=torch.float64)
  left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  bins = _mel(torch.arange(nfft // 2, dtype=torch.float64) * (sample_rate / nfft))[None]
  weights = torch.clamp(torch.minimum((bins - left) / (center - left),
                                      (right - bins) / (right - center)), min=0.0)
  return torch.cat([weights.T, torch.zeros(1, num_mel_bins, dtype=torch.float64)])


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int, num_mel_bins: int = 128, *,
                frame_length: float = 25.0, frame_shift: float = 10.0,
                window_type: str = "hanning", blackman_coeff: float = 0.42,
                preemphasis_coefficient: float = 0.97, low_freq: float = 20.0,
                high_freq: float = 0.0, snip_edges: bool = True, remove_dc_offset: bool = True,
                round_to_power_of_two: bool = True, use_log_fbank: bool = True,
                use_power: bool = True, subtract_waveform_mean: bool = True) -> torch.Tensor:
  """float32 [frames, num_mel_bins] of a mono waveform [N] (no dither)."""
  if waveform.ndim != 1:
    raise ValueError(f"waveform must be 1-D (mono), got shape {tuple(waveform.shape)}")
  length = int(sample_rate * frame_length * 0.001)
  shift = int(sample_rate * frame_shift * 0.001)
  n = waveform.shape[0]
  count = (0 if n < length else 1 + (n - length) // shift) if snip_edges else (
      (n + shift // 2) // shift)
  if count == 0:
    raise ValueError(f"waveform too short: {n} samples for one {frame_length} ms frame")
  x = waveform.to(torch.float32)
  if subtract_waveform_mean:
    x = x - x.mean()
  x = x.to(torch.float64)
  first = 0 if snip_edges else shift // 2 - length // 2
  lo, hi = min(first, 0), max(first + (count - 1) * shift + length, n)
  if (lo, hi) != (0, n):  # Kaldi reflects out-of-range samples about the edges
    index = torch.arange(lo, hi) % (2 * n)
    x = x[torch.where(index < n, index, 2 * n - 1 - index)]
  frames = x[first - lo:].unfold(0, length, shift)[:count]
  if remove_dc_offset:
    frames = frames - frames.mean(dim=1, keepdim=True)
  previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
  phase = 2.0 * math.pi * torch.arange(length, dtype=torch.float64) / max(length - 1, 1)
  frames = (frames - preemphasis_coefficient * previous) * _WINDOWS[window_type](
      phase, blackman_coeff)
  nfft = 1 << (length - 1).bit_length() if round_to_power_of_two else length
  power = torch.fft.rfft(frames, n=nfft, dim=1).abs() ** 2
  nyquist = 0.5 * sample_rate
  high = high_freq + nyquist if high_freq <= 0.0 else high_freq
  energies = (power if use_power else power.sqrt()) @ _mel_matrix(
      num_mel_bins, nfft, int(sample_rate), low_freq, high)
  if use_log_fbank:
    energies = torch.log(torch.clamp(energies, min=_LOG_FLOOR))
  return energies.to(torch.float32)


def prepare_audio(log_mel: torch.Tensor, audio_frames: int, mean: float, std: float
                  ) -> torch.Tensor:
  """[T, F] -> [audio_frames, F]: the first frames, zero-padded at the end, normalised."""
  if log_mel.shape[0] >= audio_frames:
    log_mel = log_mel[:audio_frames]
  else:
    log_mel = F.pad(log_mel, (0, 0, 0, audio_frames - log_mel.shape[0]))
  return (log_mel.to(torch.float32) - mean) / std


def prepare_frames(frames: torch.Tensor, image_size: int, mean: Any, std: Any
                   ) -> torch.Tensor:
  """uint8 [N, H, W, 3] -> float32 [N, 3, S, S] as the pipeline prepares evaluation frames."""
  x = frames.permute(0, 3, 1, 2)
  if tuple(x.shape[2:]) != (image_size, image_size):
    x = F.interpolate(x.to(torch.float32), size=(image_size, image_size), mode="bilinear",
                      align_corners=False, antialias=False)
    x = torch.clamp(torch.round(x), 0, 255)
  x = x.to(torch.float32) / 255.0
  return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def preprocess(waveform: torch.Tensor, frames: torch.Tensor, preprocessing: dict[str, Any]
               ) -> tuple[torch.Tensor, torch.Tensor]:
  """(audio [1, T, F], frames [N, 3, S, S]) from a 16 kHz-style mono waveform and uint8
  frames, with the `preprocessing` entry of an export's metadata."""
  p, feats = preprocessing, preprocessing["features"]
  if feats["log_mel"] != "kaldi":
    raise ValueError(f"the model was trained on {feats['log_mel']!r} log-mels; this front end "
                     "computes Kaldi fbank only")
  log_mel = kaldi_fbank(waveform, feats["sample_rate"], feats["mel_bins"],
                        frame_length=feats["frame_length_ms"],
                        frame_shift=feats["frame_shift_ms"])
  audio = prepare_audio(log_mel, p["audio_frames"], p["log_mel_mean"], p["log_mel_std"])
  return audio[None], prepare_frames(frames, p["image_size"], p["image_mean"], p["image_std"])
