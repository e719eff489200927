"""Log-mel features in NumPy.

`kaldi_fbank` reproduces `torchaudio.compliance.kaldi.fbank` (the AST / CAV-MAE
front end) for the options it supports, without torch; `librosa_log_mel` is an
alternative front end. Both return float32 arrays of shape [frames, mel_bins].
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

# Floor before the log: float32 machine epsilon, as in torchaudio.
_LOG_FLOOR = float(np.finfo(np.float32).eps)

# Symmetric windows (torch.hann_window(periodic=False) == np.hanning).
_WINDOWS: dict[str, Callable[[int], np.ndarray]] = {
    "hanning": np.hanning,
    "povey": lambda length: np.hanning(length) ** 0.85,
}


def _frame_geometry(sample_rate: int, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int]:
    """(frame length, frame shift) in samples; truncated exactly like torchaudio."""
    return int(sample_rate * frame_length_ms * 0.001), int(sample_rate * frame_shift_ms * 0.001)


def num_frames(num_samples: int, sample_rate: int, frame_length_ms: float = 25.0,
               frame_shift_ms: float = 10.0) -> int:
    """Number of whole frames (snip_edges=True) for `num_samples`; 0 if none fits."""
    length, shift = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    return 0 if num_samples < length else 1 + (num_samples - length) // shift


def _check_waveform(waveform: np.ndarray, sample_rate: int, frame_length_ms: float) -> None:
    """Reject non-1-D input and input shorter than one frame."""
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D (mono), got shape {waveform.shape}")
    length = int(sample_rate * frame_length_ms * 0.001)
    if waveform.shape[0] < length:
        raise ValueError(
            f"waveform too short: {waveform.shape[0]} samples, but one {frame_length_ms} ms frame "
            f"at {sample_rate} Hz needs at least {length} samples")


@functools.lru_cache(maxsize=32)
def _mel_matrix(num_mel_bins: int, nfft: int, sample_rate: int, low_freq: float,
                high_freq: float) -> np.ndarray:
    """Kaldi triangular mel weights, shape [nfft//2 + 1, num_mel_bins], read-only."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:  # Kaldi convention: non-positive means offset from Nyquist
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high_freq}")

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


@functools.lru_cache(maxsize=16)
def _window(name: str, length: int) -> np.ndarray:
    """Cached read-only analysis window."""
    if name not in _WINDOWS:
        raise ValueError(f"unknown window {name!r}; valid windows: {sorted(_WINDOWS)}")
    win = _WINDOWS[name](length).astype(np.float64)
    win.flags.writeable = False
    return win


def kaldi_fbank(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                window: str = "hanning", preemphasis: float = 0.97, low_freq: float = 20.0,
                high_freq: float = 0.0, subtract_waveform_mean: bool = True) -> np.ndarray:
    """Kaldi-compatible log-mel fbank, float32 [frames, num_mel_bins].

    Matches torchaudio.compliance.kaldi.fbank with dither=0, snip_edges=True,
    remove_dc_offset=True, round_to_power_of_two=True, use_power=True,
    use_log_fbank=True, use_energy=False. `subtract_waveform_mean` is the
    AST / CAV-MAE global mean removal applied before fbank.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    _check_waveform(waveform, sample_rate, frame_length_ms)
    length, shift = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    win = _window(window, length)
    if subtract_waveform_mean:  # float32 mean, as the reference pipeline does
        waveform = waveform - waveform.mean(dtype=np.float32)
    nfft = 1 << (length - 1).bit_length()  # next power of two >= length

    # Strided view of whole frames, then float64 for the arithmetic.
    frames = np.lib.stride_tricks.sliding_window_view(waveform, length)[::shift].astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)  # per-frame DC removal
    # Pre-emphasis with replicate padding: the sample before x[0] is x[0].
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - preemphasis * previous) * win

    spectrum = np.fft.rfft(frames, n=nfft, axis=1)  # zero pads to nfft
    power = spectrum.real ** 2 + spectrum.imag ** 2
    energies = power @ _mel_matrix(num_mel_bins, nfft, int(sample_rate), float(low_freq),
                                   float(high_freq))
    return np.log(np.maximum(energies, _LOG_FLOOR)).astype(np.float32)


def librosa_log_mel(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128,
                    frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0) -> np.ndarray:
    """librosa power mel spectrogram, natural log with float32-eps floor; float32 [frames, mel].

    Frames are aligned with `kaldi_fbank`'s (same count `num_frames`, same window
    support); n_fft is the same power of two, so low mel bands are not empty.
    """
    import librosa  # lazy: heavy optional dependency, only needed for this front end

    waveform = np.asarray(waveform, dtype=np.float32)
    _check_waveform(waveform, sample_rate, frame_length_ms)
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
    "librosa": librosa_log_mel,
}


def log_mel(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128,
            kind: str = "kaldi") -> np.ndarray:
    """Log-mel features from the front end named `kind` (a key of LOG_MEL_FUNCTIONS)."""
    try:
        fn = LOG_MEL_FUNCTIONS[kind]
    except KeyError:
        raise ValueError(f"unknown log-mel kind {kind!r}; valid kinds: {sorted(LOG_MEL_FUNCTIONS)}") from None
    return fn(waveform, sample_rate, num_mel_bins=num_mel_bins)
