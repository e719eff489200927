"""Log-mel features: float32 arrays of shape [frames, mel_bins].

`kaldi_fbank` reproduces `torchaudio.compliance.kaldi.fbank` (the AST / CAV-MAE
front end) in NumPy; `kaldi_native_fbank` computes it with the optional C++
library kaldi-native-fbank; `librosa_log_mel` is an alternative front end.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

# Floor before the log: float32 machine epsilon, as in torchaudio and Kaldi.
_LOG_FLOOR = float(np.finfo(np.float32).eps)

# Kaldi's symmetric windows, as functions of the phase a = 2*pi*n/(L-1) and blackman_coeff c.
_WINDOWS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "hanning": lambda a, c: 0.5 - 0.5 * np.cos(a),
    "povey": lambda a, c: (0.5 - 0.5 * np.cos(a)) ** 0.85,
    "hamming": lambda a, c: 0.54 - 0.46 * np.cos(a),
    "rectangular": lambda a, c: np.ones_like(a),
    "blackman": lambda a, c: c - 0.5 * np.cos(a) + (0.5 - c) * np.cos(2 * a),
}

Rng = int | np.random.Generator | None


@dataclasses.dataclass(frozen=True)
class FbankOptions:
  """torchaudio.compliance.kaldi.fbank's options: same names, meanings, units (ms, Hz) and
  defaults but num_mel_bins and window_type (AST's). Fixed: use_energy=False, vtln_warp=1,
  subtract_mean=False. `subtract_waveform_mean`: AST's global mean removal before fbank."""
  num_mel_bins: int = 128
  frame_length: float = 25.0
  frame_shift: float = 10.0
  window_type: str = "hanning"
  blackman_coeff: float = 0.42
  preemphasis_coefficient: float = 0.97
  low_freq: float = 20.0
  high_freq: float = 0.0  # <= 0: offset from Nyquist
  snip_edges: bool = True
  dither: float = 0.0
  remove_dc_offset: bool = True
  round_to_power_of_two: bool = True
  use_log_fbank: bool = True
  use_power: bool = True
  subtract_waveform_mean: bool = True

  def __post_init__(self) -> None:
    if self.window_type not in _WINDOWS:
      raise ValueError(f"unknown window_type {self.window_type!r}; valid: {sorted(_WINDOWS)}")
    if (min(self.num_mel_bins, self.frame_length, self.frame_shift) <= 0 or self.dither < 0
        or not 0.0 <= self.preemphasis_coefficient <= 1.0):
      raise ValueError(f"invalid fbank options: {self}")


def _frame_geometry(sample_rate: int, frame_length: float, frame_shift: float) -> tuple[int, int]:
  """(frame length, frame shift) in samples; truncated exactly like torchaudio."""
  return int(sample_rate * frame_length * 0.001), int(sample_rate * frame_shift * 0.001)


def num_frames(num_samples: int, sample_rate: int, frame_length: float = 25.0,
               frame_shift: float = 10.0, snip_edges: bool = True) -> int:
  """Frames Kaldi's fbank gives for `num_samples` (its NumFrames, flush=True); 0 if none."""
  length, shift = _frame_geometry(sample_rate, frame_length, frame_shift)
  if snip_edges:  # whole frames only, the first starting at sample 0
    return 0 if num_samples < length else 1 + (num_samples - length) // shift
  return (num_samples + shift // 2) // shift  # num_samples / shift, rounded to nearest


def _check_waveform(waveform: np.ndarray, sample_rate: int, frame_length: float,
                    frame_shift: float, snip_edges: bool = True) -> np.ndarray:
  """The waveform as 1-D float32; raises unless it yields at least one frame."""
  waveform = np.asarray(waveform, dtype=np.float32)
  if waveform.ndim != 1:
    raise ValueError(f"waveform must be 1-D (mono), got shape {waveform.shape}")
  if num_frames(waveform.shape[0], sample_rate, frame_length, frame_shift, snip_edges) == 0:
    length, shift = _frame_geometry(sample_rate, frame_length, frame_shift)
    raise ValueError(
        f"waveform too short: {waveform.shape[0]} samples, but one {frame_length} ms frame at "
        f"{sample_rate} Hz needs at least {length if snip_edges else shift - shift // 2} samples "
        f"(snip_edges={snip_edges})")
  return waveform


@functools.lru_cache(maxsize=32)
def _mel_matrix(num_mel_bins: int, nfft: int, sample_rate: int, low_freq: float,
                high_freq: float) -> np.ndarray:
  """Kaldi triangular mel weights, shape [nfft//2 + 1, num_mel_bins], read-only."""
  def mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)

  edges = np.linspace(mel(low_freq), mel(high_freq), num_mel_bins + 2)
  left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  bin_mel = mel(np.arange(nfft // 2) * (sample_rate / nfft))[None, :]
  weights = np.maximum(0.0, np.minimum((bin_mel - left) / (center - left),
                                       (right - bin_mel) / (right - center)))
  # The Nyquist bin never gets weight in Kaldi: append a zero row.
  matrix = np.concatenate([weights.T, np.zeros((1, num_mel_bins))], axis=0)
  matrix.flags.writeable = False  # shared via the cache; must not be mutated
  return matrix


def _window(window_type: str, length: int, blackman_coeff: float = 0.42) -> np.ndarray:
  """Kaldi's analysis window of `length` samples (float64)."""
  phase = 2.0 * np.pi * np.arange(length) / max(length - 1, 1)
  return _WINDOWS[window_type](phase, blackman_coeff)


def _prepare(waveform: np.ndarray, sample_rate: int, rng: Rng, options: dict[str, Any]
             ) -> tuple[np.ndarray, FbankOptions, tuple[int, int, int]]:
  """What the backends share: checked float32 waveform after global mean removal and
  dither, options with high_freq in Hz, and (frame length, shift, count)."""
  opts = FbankOptions(**options)
  waveform = _check_waveform(waveform, sample_rate, opts.frame_length, opts.frame_shift,
                             opts.snip_edges)
  nyquist = 0.5 * sample_rate
  high_freq = opts.high_freq + nyquist if opts.high_freq <= 0.0 else opts.high_freq
  if not 0.0 <= opts.low_freq < high_freq <= nyquist:
    raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}: {opts.low_freq}, {high_freq}")
  opts = dataclasses.replace(opts, high_freq=high_freq)  # Kaldi's resolution, done once
  if opts.subtract_waveform_mean:  # float32 mean, as the reference pipeline does
    waveform = waveform - waveform.mean(dtype=np.float32)
  if opts.dither > 0.0:
    # Kaldi draws noise per frame; we add it to the waveform so both backends see the same.
    noise = opts.dither * np.random.default_rng(rng).standard_normal(waveform.shape[0])
    waveform = waveform + noise.astype(np.float32)
  length, shift = _frame_geometry(sample_rate, opts.frame_length, opts.frame_shift)
  count = num_frames(waveform.shape[0], sample_rate, opts.frame_length, opts.frame_shift,
                     opts.snip_edges)
  return waveform, opts, (length, shift, count)


def kaldi_fbank(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128, *,
                rng: Rng = 0, **options: Any) -> np.ndarray:
  """Kaldi fbank in NumPy (float64 inside), float32 [frames, num_mel_bins].

  `options` are FbankOptions fields (torchaudio's names). `rng`, a seed or a
  Generator, draws the dither noise (dither * standard normal) reproducibly.
  """
  waveform, opts, (length, shift, count) = _prepare(
      waveform, sample_rate, rng, dict(options, num_mel_bins=num_mel_bins))
  # Kaldi's ExtractWindow: frame i starts at i*shift, or with snip_edges=False at
  # i*shift + shift//2 - length//2, with out-of-range samples reflected about the
  # edges (-1 -> 0, n -> n-1), repeatedly if needed: a reflection of period 2n.
  n, first = waveform.shape[0], 0 if opts.snip_edges else shift // 2 - length // 2
  lo, hi = min(first, 0), max(first + (count - 1) * shift + length, n)
  if (lo, hi) != (0, n):
    index = np.arange(lo, hi) % (2 * n)
    waveform = waveform[np.where(index < n, index, 2 * n - 1 - index)]
  frames = np.lib.stride_tricks.sliding_window_view(waveform, length)[first - lo::shift][:count]

  frames = frames.astype(np.float64)
  if opts.remove_dc_offset:
    frames -= frames.mean(axis=1, keepdims=True)
  # Pre-emphasis with replicate padding: the sample before x[0] is x[0].
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = (frames - opts.preemphasis_coefficient * previous) * _window(
      opts.window_type, length, opts.blackman_coeff)
  nfft = 1 << (length - 1).bit_length() if opts.round_to_power_of_two else length
  spectrum = np.fft.rfft(frames, n=nfft, axis=1)  # zero pads to nfft
  power = spectrum.real ** 2 + spectrum.imag ** 2
  energies = (power if opts.use_power else np.sqrt(power)) @ _mel_matrix(
      num_mel_bins, nfft, int(sample_rate), float(opts.low_freq), float(opts.high_freq))
  if opts.use_log_fbank:
    energies = np.log(np.maximum(energies, _LOG_FLOOR))
  return energies.astype(np.float32)


# kaldi-native-fbank's option structs -> {their name: FbankOptions field}.
_NATIVE_FIELDS: dict[str, dict[str, str]] = {
    "frame_opts": {"frame_length_ms": "frame_length", "frame_shift_ms": "frame_shift",
                   "preemph_coeff": "preemphasis_coefficient", **{name: name for name in (
                       "window_type", "blackman_coeff", "remove_dc_offset", "snip_edges",
                       "round_to_power_of_two")}},
    "mel_opts": {"num_bins": "num_mel_bins", "low_freq": "low_freq", "high_freq": "high_freq"},
    "": {"use_log_fbank": "use_log_fbank", "use_power": "use_power"},
}


def kaldi_native_fbank(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128, *,
                       rng: Rng = 0, **options: Any) -> np.ndarray:
  """`kaldi_fbank` computed by kaldi-native-fbank (C++, float32 inside); same arguments.

  Like torchaudio, that library takes the samples as given ([-1, 1] floats here),
  so no int16 rescaling is needed for the two to agree.
  """
  try:
    import kaldi_native_fbank as knf  # lazy: optional dependency
  except ImportError as e:
    raise ImportError("kaldi_native_fbank needs the optional package kaldi-native-fbank: "
                      "pip install kaldi-native-fbank") from e
  waveform, opts, (length, _, count) = _prepare(
      waveform, sample_rate, rng, dict(options, num_mel_bins=num_mel_bins))
  if length % 2 and not opts.round_to_power_of_two:  # knf would exit() the whole process
    raise ValueError(f"kaldi-native-fbank needs an even FFT size, got {length}; "
                     "use round_to_power_of_two=True or kaldi_fbank")
  native = knf.FbankOptions()
  for group, fields in _NATIVE_FIELDS.items():
    for theirs, ours in fields.items():
      setattr(getattr(native, group) if group else native, theirs, getattr(opts, ours))
  native.frame_opts.samp_freq = float(sample_rate)
  native.frame_opts.dither = 0.0  # _prepare dithered, seeded; knf's noise is not
  native.use_energy = False

  fbank = knf.OnlineFbank(native)
  fbank.accept_waveform(float(sample_rate), waveform.tolist())  # a list converts faster
  fbank.input_finished()
  if fbank.num_frames_ready != count:  # knf rounds the frame geometry in float32
    raise RuntimeError(f"kaldi-native-fbank gave {fbank.num_frames_ready} frames, not {count}")
  return np.stack([fbank.get_frame(i) for i in range(count)]).astype(np.float32)


def librosa_log_mel(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128,
                    frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0) -> np.ndarray:
  """librosa power mel spectrogram, natural log with float32-eps floor; float32 [frames, mel].

  Frames are aligned with `kaldi_fbank`'s (same count `num_frames`, same window
  support); n_fft is the same power of two, so low mel bands are not empty.
  """
  import librosa  # lazy: heavy optional dependency, only needed for this front end

  waveform = _check_waveform(waveform, sample_rate, frame_length_ms, frame_shift_ms)
  length, shift = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
  nfft = 1 << (length - 1).bit_length()
  # librosa centres the win_length window inside n_fft; pad so that window
  # covers exactly the Kaldi frame [i*shift, i*shift + length).
  left = (nfft - length) // 2
  padded = np.pad(waveform, (left, nfft - length - left))
  mel = librosa.feature.melspectrogram(
      y=padded, sr=sample_rate, n_fft=nfft, hop_length=shift, win_length=length,
      window="hann", center=False, power=2.0, n_mels=num_mel_bins)
  return np.log(np.maximum(mel.T, _LOG_FLOOR)).astype(np.float32)


LOG_MEL_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "kaldi": kaldi_fbank,
    "kaldi_native": kaldi_native_fbank,
    "librosa": librosa_log_mel,
}


def log_mel(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128,
            kind: str = "kaldi") -> np.ndarray:
  """Log-mel features from the front end named `kind` (a key of LOG_MEL_FUNCTIONS)."""
  try:
    fn = LOG_MEL_FUNCTIONS[kind]
  except KeyError:
    raise ValueError(f"unknown log-mel kind {kind!r}; valid kinds: "
                     f"{sorted(LOG_MEL_FUNCTIONS)}") from None
  return fn(waveform, sample_rate, num_mel_bins=num_mel_bins)
