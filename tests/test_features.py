"""Tests for avmae.data.features against the torchaudio kaldi.fbank golden fixtures.

Both Kaldi backends (NumPy `kaldi_fbank`, C++ `kaldi_native_fbank`) are held to the
fixture README's tolerances; kaldi-native-fbank, an independent Kaldi port, also
cross-checks the options the fixtures do not vary.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from avmae.data import features
from avmae.data.features import (
    LOG_MEL_FUNCTIONS,
    FbankOptions,
    kaldi_fbank,
    kaldi_native_fbank,
    librosa_log_mel,
    log_mel,
    num_frames,
)

try:
  import kaldi_native_fbank as _knf
  _KNF_ERROR = ""
except ImportError as e:  # optional dependency: its tests skip, the NumPy ones still run
  _knf = None
  _KNF_ERROR = f"kaldi-native-fbank cannot be imported ({e}): pip install kaldi-native-fbank"
_NO_KNF = pytest.mark.skipif(_knf is None, reason=_KNF_ERROR)

# Golden outputs of the reference Kaldi fbank (shared/fixtures/kaldi_fbank), kept in the repo.
FIXTURE_DIR = Path(__file__).resolve().parent / "golden" / "kaldi_fbank"
FIXTURES = sorted(FIXTURE_DIR.glob("kaldi_fbank_*.npz"))
FIXTURE_PARAMS = [pytest.param(p, id=p.stem) for p in FIXTURES]
BACKENDS = [pytest.param(kaldi_fbank, id="numpy"),
            pytest.param(kaldi_native_fbank, id="kaldi_native", marks=_NO_KNF)]
WINDOW_TYPES = ["hanning", "povey", "hamming", "rectangular", "blackman"]

LOG_FLOOR = np.float32(-15.942385)  # ln(float32 eps), as stored in float32
DB60_IN_LN = 13.8  # 60 dB expressed in natural-log units (README's value)

# fbank options FbankOptions does not expose: the fixtures must use these values.
_FIXED_OPTIONS = {"use_energy": False, "subtract_mean": False, "vtln_warp": 1.0, "channel": -1,
                  "min_duration": 0.0}
_OPTION_NAMES = [field.name for field in dataclasses.fields(FbankOptions)]


def _load(path: Path) -> tuple[np.ndarray, int, dict, np.ndarray]:
  with np.load(path) as npz:
    params = json.loads(str(npz["params_resolved"]))
    explicit = json.loads(str(npz["params"]))
    assert explicit.items() <= params.items()  # resolved = explicit merged over defaults
    return npz["waveform"], int(npz["sample_rate"]), params, npz["fbank"]


def _kwargs(params: dict, sample_rate: int) -> dict:
  """torchaudio fbank keywords -> FbankOptions fields (same names)."""
  for key, value in _FIXED_OPTIONS.items():
    assert params[key] == value, f"fixture uses unsupported {key}={params[key]!r}"
  assert params["sample_frequency"] == sample_rate
  return {name: params[name] for name in _OPTION_NAMES}  # every option comes from the fixture


def _assert_readme_tolerance(out: np.ndarray, ref: np.ndarray) -> None:
  """The fixture README's suggested tolerances (natural-log units)."""
  assert out.dtype == np.float32
  assert out.shape == ref.shape
  diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
  assert diff.max() <= 1e-2, f"max abs diff {diff.max():.3e}"
  assert diff.mean() <= 2e-4, f"mean abs diff {diff.mean():.3e}"
  # Entries near the frame's strongest band must match tightly; far below it
  # the reference is dominated by its own float32 round-off.
  near_peak = ref >= ref.max(axis=1, keepdims=True) - DB60_IN_LN
  assert diff[near_peak].max() <= 2e-3, f"<=60 dB max abs diff {diff[near_peak].max():.3e}"


def _test_signal(num_samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
  """Noise + chirp + DC offset: every option (DC removal included) has an effect."""
  t = np.arange(num_samples) / sample_rate
  noise = 0.05 * np.random.default_rng(seed).standard_normal(num_samples)
  chirp = 0.2 * np.sin(2 * np.pi * (200.0 + 2000.0 * t) * t)
  return (noise + chirp + 0.05).astype(np.float32)


# --- golden fixtures ------------------------------------------------------------------------

@pytest.mark.parametrize("fbank", BACKENDS)
@pytest.mark.parametrize("path", FIXTURE_PARAMS)
def test_fbank_matches_fixture(path: Path, fbank: Callable[..., np.ndarray]) -> None:
  waveform, sample_rate, params, ref = _load(path)
  out = fbank(waveform, sample_rate, **_kwargs(params, sample_rate))
  _assert_readme_tolerance(out, ref)
  if params["num_mel_bins"] == 128 and sample_rate == 16000:
    # Band 3 contains no FFT bin at 512-point FFT / 16 kHz: always the floor.
    np.testing.assert_array_equal(ref[:, 3], LOG_FLOOR)
    np.testing.assert_array_equal(out[:, 3], LOG_FLOOR)


@pytest.mark.parametrize("path", FIXTURE_PARAMS)
def test_num_frames_matches_fixture(path: Path) -> None:
  waveform, sample_rate, params, ref = _load(path)
  n = num_frames(waveform.shape[0], sample_rate, params["frame_length"], params["frame_shift"],
                 params["snip_edges"])
  assert n == ref.shape[0]


@pytest.mark.parametrize("path", FIXTURE_PARAMS)
def test_fixture_defaults_are_ours(path: Path) -> None:
  """Options a fixture leaves at torchaudio's default have the same default in FbankOptions."""
  with np.load(path) as npz:
    explicit = json.loads(str(npz["params"]))
  _, _, params, _ = _load(path)
  ours = dataclasses.asdict(FbankOptions())
  for name in set(_OPTION_NAMES) - set(explicit):
    assert params[name] == ours[name], name


# --- frame geometry, snip_edges ---------------------------------------------------------------

def test_num_frames_geometry() -> None:
  assert num_frames(400, 16000) == 1
  assert num_frames(399, 16000) == 0
  assert num_frames(160000, 16000) == 998
  # 22.05 kHz truncates to 551-sample frames with a 220-sample shift.
  assert num_frames(551, 22050) == 1
  assert num_frames(551 + 219, 22050) == 1
  assert num_frames(551 + 220, 22050) == 2
  # snip_edges=False: Kaldi rounds num_samples / shift to the nearest integer.
  assert num_frames(160000, 16000, snip_edges=False) == 1000
  assert num_frames(79, 16000, snip_edges=False) == 0
  assert num_frames(80, 16000, snip_edges=False) == 1
  assert num_frames(239, 16000, snip_edges=False) == 1
  assert num_frames(240, 16000, snip_edges=False) == 2
  assert num_frames(110, 22050, snip_edges=False) == 1  # shift 220: 110 rounds up


def _kaldi_extract_window(wave: np.ndarray, frame: int, length: int, shift: int) -> np.ndarray:
  """Kaldi's ExtractWindow for snip_edges=False, written as its per-sample loop."""
  start = shift * frame + shift // 2 - length // 2
  out = np.empty(length, dtype=wave.dtype)
  for s in range(length):
    i = start + s
    while i < 0 or i >= len(wave):  # reflect: -1 -> 0, -2 -> 1; n -> n-1, n+1 -> n-2
      i = -i - 1 if i < 0 else 2 * len(wave) - 1 - i
    out[s] = wave[i]
  return out


@pytest.mark.parametrize("fbank", BACKENDS)
@pytest.mark.parametrize("sample_rate, num_samples", [
    (16000, 4837),   # reflected at both ends
    (16000, 100),    # shorter than a frame: reflected repeatedly
    (16000, 80),     # the shortest input that yields a frame
    (22050, 3000),   # odd frame length (551): first frame starts at -165
])
def test_snip_edges_false_matches_kaldi(sample_rate: int, num_samples: int,
                                        fbank: Callable[..., np.ndarray]) -> None:
  wave = _test_signal(num_samples, sample_rate)
  options = {"window_type": "povey", "subtract_waveform_mean": False}
  out = fbank(wave, sample_rate, 64, snip_edges=False, **options)

  length, shift = int(sample_rate * 0.025), int(sample_rate * 0.010)
  count = (num_samples + shift // 2) // shift
  assert out.shape == (count, 64) == (num_frames(num_samples, sample_rate, snip_edges=False), 64)
  # Each Kaldi window alone is a waveform of exactly one snip_edges=True frame.
  ref = np.concatenate([
      kaldi_fbank(_kaldi_extract_window(wave, f, length, shift), sample_rate, 64, **options)
      for f in range(count)])
  _assert_readme_tolerance(out, ref)
  if fbank is kaldi_fbank:  # same arithmetic, only the framing differs
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# --- dither ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fbank", BACKENDS)
def test_dither_is_seeded(fbank: Callable[..., np.ndarray]) -> None:
  wave = _test_signal(8000, 16000)
  first = fbank(wave, 16000, dither=0.01, rng=1)
  np.testing.assert_array_equal(first, fbank(wave, 16000, dither=0.01, rng=1))
  np.testing.assert_array_equal(first, fbank(wave, 16000, dither=0.01,
                                             rng=np.random.default_rng(1)))
  assert np.abs(first - fbank(wave, 16000, dither=0.01, rng=2)).max() > 1e-3
  # Without dither the rng is never used.
  np.testing.assert_array_equal(fbank(wave, 16000, rng=1), fbank(wave, 16000, rng=2))


@pytest.mark.parametrize("fbank", BACKENDS)
def test_dither_adds_scaled_standard_normal(fbank: Callable[..., np.ndarray]) -> None:
  """dither * standard_normal from default_rng(rng), added after the global mean removal."""
  wave = _test_signal(8000, 16000)
  noise = (0.3 * np.random.default_rng(5).standard_normal(wave.shape[0])).astype(np.float32)
  by_hand = (wave - wave.mean(dtype=np.float32)) + noise
  np.testing.assert_array_equal(fbank(wave, 16000, dither=0.3, rng=5),
                                fbank(by_hand, 16000, subtract_waveform_mean=False))


@pytest.mark.parametrize("fbank", BACKENDS)
def test_tiny_dither_is_close_to_none(fbank: Callable[..., np.ndarray]) -> None:
  wave = _test_signal(16000, 16000)
  plain = fbank(wave, 16000)
  dithered = fbank(wave, 16000, dither=1e-6, rng=3)
  assert not np.array_equal(plain, dithered)
  # The noise enters band energies through the signal x noise cross term, so log energies
  # move by about 2 * noise / signal amplitude: ~1e-3 in bands 40 dB below the peak here.
  diff = np.abs(dithered - plain)
  assert diff.max() <= 5e-3 and diff.mean() <= 1e-4, (diff.max(), diff.mean())


@_NO_KNF
def test_dither_same_in_both_backends() -> None:
  wave = _test_signal(8000, 16000)
  _assert_readme_tolerance(kaldi_native_fbank(wave, 16000, dither=0.1, rng=4),
                           kaldi_fbank(wave, 16000, dither=0.1, rng=4))


# --- windows -----------------------------------------------------------------------------------

# Independent definitions of Kaldi's windows (numpy's are the same symmetric formulas).
EXPECTED_WINDOWS: dict[str, Callable[[int], np.ndarray]] = {
    "hanning": np.hanning,                          # 0.5 - 0.5 cos(2 pi n / (L-1))
    "povey": lambda n: np.hanning(n) ** 0.85,
    "hamming": np.hamming,                          # 0.54 - 0.46 cos(2 pi n / (L-1))
    "rectangular": np.ones,
    "blackman": np.blackman,                        # 0.42 - 0.5 cos(a) + 0.08 cos(2a)
}


@pytest.mark.parametrize("window_type", WINDOW_TYPES)
@pytest.mark.parametrize("length", [400, 551])
def test_window_formula(window_type: str, length: int) -> None:
  win = features._window(window_type, length)
  assert win.shape == (length,)
  np.testing.assert_allclose(win, EXPECTED_WINDOWS[window_type](length), rtol=0, atol=1e-12)
  np.testing.assert_allclose(win, win[::-1], rtol=0, atol=1e-12)  # symmetric (periodic=False)
  if _knf is not None:  # kaldi-native-fbank's window (float32) for the same options
    frame_opts = _knf.FrameExtractionOptions()
    frame_opts.samp_freq, frame_opts.frame_length_ms = 1000.0 * length, 1.0
    frame_opts.window_type = window_type
    np.testing.assert_allclose(win, _knf.FeatureWindowFunction(frame_opts).window, atol=1e-6)


def test_blackman_coeff() -> None:
  a = 2 * np.pi * np.arange(400) / 399
  np.testing.assert_allclose(features._window("blackman", 400, 0.36),
                             0.36 - 0.5 * np.cos(a) + 0.14 * np.cos(2 * a), rtol=0, atol=1e-12)
  # Only blackman has a coefficient.
  np.testing.assert_allclose(features._window("hamming", 400, 0.5), np.hamming(400))


# --- every option against kaldi-native-fbank ---------------------------------------------------

_OPTION_CASES = [
    {"window_type": name} for name in WINDOW_TYPES if name != "hanning"] + [
    {"window_type": "blackman", "blackman_coeff": 0.36},  # (0.5 would be hanning)
    {"snip_edges": False},
    {"preemphasis_coefficient": 0.0},
    {"preemphasis_coefficient": 1.0},
    {"remove_dc_offset": False, "subtract_waveform_mean": False},
    {"round_to_power_of_two": False},
    {"use_power": False},
    {"low_freq": 0.0, "high_freq": 7000.0},
    {"low_freq": 100.0, "high_freq": -400.0},
    {"num_mel_bins": 40},
    {"frame_length": 32.0, "frame_shift": 12.5},
]


@_NO_KNF
@pytest.mark.parametrize("options", _OPTION_CASES, ids=lambda o: ",".join(map(str, o.items())))
def test_options_match_kaldi_native(options: dict) -> None:
  wave = _test_signal(8000, 16000)
  out = kaldi_fbank(wave, 16000, **options)
  _assert_readme_tolerance(kaldi_native_fbank(wave, 16000, **options), out)
  default = kaldi_fbank(wave, 16000)
  # The option must matter here, or agreeing on it proves nothing.
  assert out.shape != default.shape or np.abs(out - default).max() > 1e-2


@pytest.mark.parametrize("fbank", BACKENDS)
def test_linear_fbank(fbank: Callable[..., np.ndarray]) -> None:
  wave = _test_signal(8000, 16000)
  linear = fbank(wave, 16000, use_log_fbank=False)
  assert linear.dtype == np.float32 and linear.min() >= 0.0
  np.testing.assert_allclose(np.log(np.maximum(linear.astype(np.float64), 1.1920929e-07)),
                             fbank(wave, 16000), rtol=0, atol=1e-4)


def test_round_to_power_of_two_odd_length() -> None:
  """torchaudio allows an odd FFT size (551 at 22.05 kHz); kaldi-native-fbank does not."""
  wave = _test_signal(3000, 22050)
  out = kaldi_fbank(wave, 22050, round_to_power_of_two=False)
  assert out.shape == (num_frames(3000, 22050), 128) and np.all(np.isfinite(out))
  assert np.abs(out - kaldi_fbank(wave, 22050)).max() > 1e-2
  if _knf is not None:
    with pytest.raises(ValueError, match="even FFT size, got 551"):
      kaldi_native_fbank(wave, 22050, round_to_power_of_two=False)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fbank", BACKENDS)
def test_too_short_waveform(fbank: Callable[..., np.ndarray]) -> None:
  with pytest.raises(ValueError, match=r"too short.*399 samples.*at least 400 samples"):
    fbank(np.zeros(399, np.float32), 16000)
  with pytest.raises(ValueError, match=r"too short.*79 samples.*at least 80 samples"):
    fbank(np.zeros(79, np.float32), 16000, snip_edges=False)


def test_too_short_via_log_mel() -> None:
  with pytest.raises(ValueError, match="at least 400 samples"):
    log_mel(np.zeros(10, np.float32), 16000, 128, kind="kaldi")


@pytest.mark.parametrize("fbank", BACKENDS)
def test_bad_options(fbank: Callable[..., np.ndarray]) -> None:
  wave = np.zeros(16000, np.float32)
  with pytest.raises(ValueError, match="1-D"):
    fbank(np.zeros((1, 16000), np.float32), 16000)
  with pytest.raises(ValueError, match=r"unknown window_type 'hann'.*blackman.*hamming"):
    fbank(wave, 16000, window_type="hann")  # knf's periodic window: not torchaudio's
  with pytest.raises(TypeError, match="window"):
    fbank(wave, 16000, window="hanning")  # the old keyword is gone: torchaudio's names only
  for bad in ({"frame_shift": 0.0}, {"dither": -1.0}, {"preemphasis_coefficient": 1.5},
              {"num_mel_bins": 0}):
    with pytest.raises(ValueError, match="invalid fbank options"):
      fbank(wave, 16000, **bad)
  for low, high in ((9000.0, 0.0), (100.0, 9000.0), (4000.0, 3000.0), (0.0, -8000.0)):
    with pytest.raises(ValueError, match="low_freq < high_freq"):
      fbank(wave, 16000, low_freq=low, high_freq=high)


def test_missing_kaldi_native_fbank(monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setitem(sys.modules, "kaldi_native_fbank", None)  # makes the import fail
  with pytest.raises(ImportError, match="pip install kaldi-native-fbank"):
    kaldi_native_fbank(np.zeros(16000, np.float32), 16000)


def test_unknown_kind() -> None:
  with pytest.raises(ValueError, match=r"unknown log-mel kind 'mfcc'.*kaldi.*native.*librosa"):
    log_mel(np.zeros(16000, np.float32), 16000, 128, kind="mfcc")


# --- dispatch and the librosa front end -------------------------------------------------------

def test_log_mel_dispatch() -> None:
  assert LOG_MEL_FUNCTIONS == {"kaldi": kaldi_fbank, "kaldi_native": kaldi_native_fbank,
                               "librosa": librosa_log_mel}
  wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
  np.testing.assert_array_equal(log_mel(wave, 16000, 64), kaldi_fbank(wave, 16000, 64))


@_NO_KNF
def test_log_mel_kaldi_native() -> None:
  wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
  out = log_mel(wave, 16000, 64, kind="kaldi_native")
  np.testing.assert_array_equal(out, kaldi_native_fbank(wave, 16000, 64))
  _assert_readme_tolerance(out, kaldi_fbank(wave, 16000, 64))


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
