"""Tests for avmae.data.features against the torchaudio kaldi.fbank golden fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avmae.data.features import (
    LOG_MEL_FUNCTIONS,
    kaldi_fbank,
    librosa_log_mel,
    log_mel,
    num_frames,
)

# The repo is cloned with shared/ beside it.
FIXTURE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "kaldi_fbank"
FIXTURES = sorted(FIXTURE_DIR.glob("kaldi_fbank_*.npz")) if FIXTURE_DIR.is_dir() else []
_NO_FIXTURES = pytest.mark.skip(reason=f"fixture directory {FIXTURE_DIR} is absent")
FIXTURE_PARAMS = [pytest.param(p, id=p.stem) for p in FIXTURES] or [
    pytest.param(None, marks=_NO_FIXTURES, id="no-fixtures")
]

LOG_FLOOR = np.float32(-15.942385)  # ln(float32 eps), as stored in float32
DB60_IN_LN = 13.8  # 60 dB expressed in natural-log units (README's value)

# fbank options kaldi_fbank does not expose: the fixtures must use these values.
_FIXED_OPTIONS = {
    "dither": 0.0, "snip_edges": True, "remove_dc_offset": True, "round_to_power_of_two": True,
    "use_power": True, "use_log_fbank": True, "use_energy": False, "subtract_mean": False,
    "vtln_warp": 1.0, "channel": -1, "min_duration": 0.0,
}


def _load(path: Path) -> tuple[np.ndarray, int, dict, np.ndarray]:
    with np.load(path) as npz:
        params = json.loads(str(npz["params_resolved"]))
        explicit = json.loads(str(npz["params"]))
        assert explicit.items() <= params.items()  # resolved = explicit merged over defaults
        return npz["waveform"], int(npz["sample_rate"]), params, npz["fbank"]


def _kwargs(params: dict, sample_rate: int) -> dict:
    """Map torchaudio fbank keywords onto kaldi_fbank arguments."""
    for key, value in _FIXED_OPTIONS.items():
        assert params[key] == value, f"fixture uses unsupported {key}={params[key]!r}"
    assert params["sample_frequency"] == sample_rate
    return {
        "num_mel_bins": params["num_mel_bins"],
        "frame_length_ms": params["frame_length"],
        "frame_shift_ms": params["frame_shift"],
        "window": params["window_type"],
        "preemphasis": params["preemphasis_coefficient"],
        "low_freq": params["low_freq"],
        "high_freq": params["high_freq"],
        "subtract_waveform_mean": params["subtract_waveform_mean"],
    }


@pytest.mark.parametrize("path", FIXTURE_PARAMS)
def test_kaldi_fbank_matches_fixture(path: Path) -> None:
    waveform, sample_rate, params, ref = _load(path)
    out = kaldi_fbank(waveform, sample_rate, **_kwargs(params, sample_rate))

    assert out.dtype == np.float32
    assert out.shape == ref.shape
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    assert diff.max() <= 1e-2, f"max abs diff {diff.max():.3e}"
    assert diff.mean() <= 2e-4, f"mean abs diff {diff.mean():.3e}"
    # Entries near the frame's strongest band must match tightly; far below it
    # the reference is dominated by its own float32 round-off.
    near_peak = ref >= ref.max(axis=1, keepdims=True) - DB60_IN_LN
    assert diff[near_peak].max() <= 2e-3, f"<=60 dB max abs diff {diff[near_peak].max():.3e}"

    if params["num_mel_bins"] == 128 and sample_rate == 16000:
        # Band 3 contains no FFT bin at 512-point FFT / 16 kHz: always the floor.
        np.testing.assert_array_equal(ref[:, 3], LOG_FLOOR)
        np.testing.assert_array_equal(out[:, 3], LOG_FLOOR)


@pytest.mark.parametrize("path", FIXTURE_PARAMS)
def test_num_frames_matches_fixture(path: Path) -> None:
    waveform, sample_rate, params, ref = _load(path)
    n = num_frames(waveform.shape[0], sample_rate, params["frame_length"], params["frame_shift"])
    assert n == ref.shape[0]


def test_num_frames_geometry() -> None:
    assert num_frames(400, 16000) == 1
    assert num_frames(399, 16000) == 0
    assert num_frames(160000, 16000) == 998
    # 22.05 kHz truncates to 551-sample frames with a 220-sample shift.
    assert num_frames(551, 22050) == 1
    assert num_frames(551 + 219, 22050) == 1
    assert num_frames(551 + 220, 22050) == 2


def test_too_short_waveform() -> None:
    with pytest.raises(ValueError, match=r"too short.*399 samples.*at least 400 samples"):
        kaldi_fbank(np.zeros(399, np.float32), 16000)
    with pytest.raises(ValueError, match="at least 400 samples"):
        log_mel(np.zeros(10, np.float32), 16000, 128, kind="kaldi")


def test_not_one_dimensional() -> None:
    with pytest.raises(ValueError, match="1-D"):
        kaldi_fbank(np.zeros((1, 16000), np.float32), 16000)


def test_unknown_window() -> None:
    with pytest.raises(ValueError, match=r"unknown window 'hamming'.*hanning.*povey"):
        kaldi_fbank(np.zeros(16000, np.float32), 16000, window="hamming")


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"unknown log-mel kind 'mfcc'.*kaldi.*librosa"):
        log_mel(np.zeros(16000, np.float32), 16000, 128, kind="mfcc")


def test_log_mel_dispatch() -> None:
    assert LOG_MEL_FUNCTIONS == {"kaldi": kaldi_fbank, "librosa": librosa_log_mel}
    wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
    np.testing.assert_array_equal(log_mel(wave, 16000, 64), kaldi_fbank(wave, 16000, 64))


@pytest.mark.parametrize("sample_rate", [16000, 22050])
def test_librosa_log_mel_tone(sample_rate: int) -> None:
    pytest.importorskip("librosa")
    t = np.arange(int(0.5 * sample_rate)) / sample_rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = librosa_log_mel(tone, sample_rate, num_mel_bins=128)
    assert out.dtype == np.float32
    assert out.shape == (num_frames(tone.shape[0], sample_rate), 128)
    assert np.all(np.isfinite(out))
    assert out.min() >= LOG_FLOOR
    # The tone's energy should land in a low band, not at the top of the range.
    assert int(np.argmax(out.mean(axis=0))) < 32
    via_dispatch = log_mel(tone, sample_rate, 128, kind="librosa")
    np.testing.assert_array_equal(via_dispatch, out)
