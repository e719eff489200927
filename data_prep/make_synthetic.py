"""Synthetic audio-visual dataset: classes defined by a sound and a synchronised moving shape.

    python -m data_prep.make_synthetic --out_dir DIR [--num_train 2048 --num_eval 128 ...]

Each class fixes, from its index only (so every seed shares the same classes):
- a sound: a harmonic timbre and a rhythm (a cycle of inter-onset intervals, as fractions of
  the clip, that repeats from a random phase, so clip statistics do not depend on time);
- a visual pattern: a shape and a drift (direction of motion across the frame).
Nuisance varies per clip: pitch, loudness, noise levels, position, size, colours, rhythm
phase and jitter, per-event strength. Two of them tie a clip's sound to its own picture, not
only to its class: every sound event makes the shape brighter with the same envelope (the
shape's contrast in the frame at time t follows the audio envelope at t), and the larger the
shape, the lower the pitch (as a larger object rings lower).
"""

from __future__ import annotations

import inspect
import time
import zlib
from typing import Any, Callable

import numpy as np
from absl import app, flags

from avmae.data import features
from avmae.data.writer import DatasetWriter

# Relative amplitudes of harmonics 1..6.
TIMBRES: dict[str, tuple[float, ...]] = {
    "flat": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "dark": (1.0, 0.25, 0.11, 0.06, 0.04, 0.03),
    "odd": (1.0, 0.0, 0.6, 0.0, 0.4, 0.0),
    "even": (0.3, 1.0, 0.0, 0.8, 0.0, 0.6),
    "bright": (0.15, 0.3, 0.5, 0.7, 0.9, 1.0),
    "formant": (0.2, 0.3, 1.0, 1.0, 0.3, 0.2),
    "hollow": (1.0, 0.0, 0.0, 0.9, 0.0, 0.0),
    "twin": (0.0, 0.0, 0.0, 0.0, 1.0, 0.9),
}

# Cycles of inter-onset intervals as fractions of the clip; all cyclically distinct.
RHYTHMS: dict[str, tuple[float, ...]] = {
    "single": (0.6,),
    "slow": (0.35,),
    "medium": (0.22,),
    "fast": (0.14,),
    "pairs": (0.07, 0.38),
    "triplets": (0.07, 0.07, 0.36),
    "long_short": (0.28, 0.12),
    "gallop": (0.24, 0.09, 0.09),
}
DECAY_PER_IOI = 0.4  # envelope decay time / shortest interval: events stay separable
ATTACK_PER_DECAY = 0.1


def _rotate45(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return (x + y) * np.sqrt(0.5), (y - x) * np.sqrt(0.5)


def _cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return np.minimum(np.maximum(abs(x) - 0.3, abs(y) - 1.0), np.maximum(abs(y) - 0.3, abs(x) - 1.0))


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  # Upward triangle (image y points down), circumradius 1.1: max over the outward edge normals.
  return np.maximum(np.maximum(y, 0.866 * x - 0.5 * y), -0.866 * x - 0.5 * y) - 0.55


# Signed distance (in units of the shape radius, negative inside) of x, y from the shape.
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: np.hypot(x, y) - 1.0,
    "square": lambda x, y: np.maximum(abs(x), abs(y)) - 0.8,
    "triangle": _triangle,
    "cross": _cross,
    "ring": lambda x, y: abs(np.hypot(x, y) - 0.75) - 0.25,
    "diamond": lambda x, y: (abs(x) + abs(y) - 1.1) * np.sqrt(0.5),
    "x_cross": lambda x, y: _cross(*_rotate45(x, y)),
    "bar": lambda x, y: np.maximum(abs(x) - 1.0, abs(y) - 0.35),
}

# Displacement (x, y) over the clip, in units of the frame size; image y points down.
_D = 0.35 * np.sqrt(0.5)
MOTIONS: dict[str, tuple[float, float]] = {
    "drift_right": (0.35, 0.0), "drift_left": (-0.35, 0.0),
    "drift_down": (0.0, 0.35), "drift_up": (0.0, -0.35),
    "drift_down_right": (_D, _D), "drift_up_left": (-_D, -_D),
    "drift_up_right": (_D, -_D), "drift_down_left": (-_D, _D),
}

SPLITS = ("train", "eval")
_SHAPE_BASE = 0.35  # visibility of the shape between events, so every frame shows it
_F0_RANGE = (160.0, 320.0)  # Hz, log-uniform
_RADIUS_RANGE = (0.11, 0.19)  # fractions of the frame size, largest at the lowest pitch
_RADIUS_JITTER = 0.1  # of the range: the size follows the pitch, not exactly
_BACKGROUND_RANGE = (0.05, 0.4)  # per RGB channel
_FOREGROUND_RANGE = (0.6, 1.0)


def class_spec(label: int) -> dict[str, str]:
  """The timbre, rhythm, shape and motion of class `label`; all differ among the first 8."""
  def pick(table: dict, stride: int) -> str:
    names = list(table)
    # A different stride per attribute keeps combinations distinct beyond len(table) classes.
    return names[(label + stride * (label // len(names))) % len(names)]
  return {"timbre": pick(TIMBRES, 0), "rhythm": pick(RHYTHMS, 1),
          "shape": pick(SHAPES, 0), "motion": pick(MOTIONS, 3)}


def label_name(label: int) -> str:
  s = class_spec(label)
  return f"{s['timbre']}-{s['rhythm']}|{s['shape']}-{s['motion']}"


def _rng(seed: int, split: str, *key: int) -> np.random.Generator:
  # crc32 rather than hash(): stable across processes (PYTHONHASHSEED).
  return np.random.default_rng([seed, zlib.crc32(split.encode()), *key])


def clip_label(seed: int, split: str, index: int, num_classes: int) -> int:
  """Class of clip `index`: balanced within each block of `num_classes` consecutive clips."""
  block, position = divmod(index, num_classes)
  return int(_rng(seed, split, 1, block).permutation(num_classes)[position])


def envelope(t: np.ndarray, onsets: np.ndarray, strengths: np.ndarray, decay: float
             ) -> np.ndarray:
  """Sum of attack-decay events at times `t` (seconds), saturated at 1."""
  attack = ATTACK_PER_DECAY * decay
  u = t[None, :] - onsets[:, None]
  shape = np.where(u < attack, np.clip(u / attack, 0.0, 1.0),
                   np.exp(-np.maximum(u - attack, 0.0) / decay))
  return np.minimum(strengths @ shape, 1.0)


def _events(spec: dict[str, str], rng: np.random.Generator, clip_seconds: float
            ) -> tuple[np.ndarray, np.ndarray, float]:
  intervals = np.asarray(RHYTHMS[spec["rhythm"]]) * clip_seconds
  period = intervals.sum()
  # Start a whole period early from a random phase: events before 0 decay into the clip.
  start = -period - rng.uniform(0.0, period)
  cycles = int(np.ceil((clip_seconds - start) / period)) + 1
  onsets = start + np.concatenate([[0.0], np.cumsum(np.tile(intervals, cycles))])
  onsets = onsets[onsets < clip_seconds]
  decay = DECAY_PER_IOI * intervals.min()
  onsets = onsets + rng.normal(0.0, 0.05 * intervals.min(), onsets.shape)
  strengths = rng.uniform(0.6, 1.0, onsets.shape)
  return onsets, strengths, decay


def synth_audio(spec: dict[str, str], env: np.ndarray, pitch: float, rng: np.random.Generator,
                sample_rate: int) -> np.ndarray:
  """Harmonic tone of the class timbre shaped by `env`, plus noise; `pitch` in [0, 1] places
  f0 log-uniformly in _F0_RANGE."""
  t = np.arange(env.shape[0]) / sample_rate
  amps = np.asarray(TIMBRES[spec["timbre"]])
  f0 = np.exp(np.log(_F0_RANGE[0]) + pitch * np.log(_F0_RANGE[1] / _F0_RANGE[0]))
  harmonics = np.arange(1, len(amps) + 1)
  phases = rng.uniform(0.0, 2 * np.pi, len(amps))
  tone = amps @ np.sin(2 * np.pi * f0 * harmonics[:, None] * t[None, :] + phases[:, None])
  tone /= amps.sum()
  gain = 0.5 * 10 ** (rng.uniform(-20.0, 0.0) / 20)
  noise_std = gain * 10 ** (-rng.uniform(15.0, 35.0) / 20)
  wave = gain * env * tone + rng.normal(0.0, noise_std, t.shape)
  return wave.astype(np.float32)


def render_frames(spec: dict[str, str], intensity: np.ndarray, progress: np.ndarray,
                  pitch: float, rng: np.random.Generator, size: int) -> np.ndarray:
  """uint8 [N, size, size, 3]: the shape at each frame's position and brightness, larger for
  a lower `pitch` (in [0, 1], as synth_audio's)."""
  smallest, largest = _RADIUS_RANGE
  jitter = _RADIUS_JITTER * rng.uniform(-0.5, 0.5)
  radius = size * (smallest + (largest - smallest) * np.clip(1.0 - pitch + jitter, 0.0, 1.0))
  move = np.asarray(MOTIONS[spec["motion"]]) * size
  margin = 1.5 * radius + 1  # sdf extents reach ~1.4 radius (x_cross tips)
  lo = margin - np.minimum(move, 0.0)
  hi = size - margin - np.maximum(move, 0.0)
  start = rng.uniform(lo, np.maximum(hi, lo))
  # The shape is a light that flashes with the sound: brighter than the background in every
  # channel, of any hue. (A foreground of random polarity, darker or brighter at random,
  # made shape identity a colour-XOR that a tiny ViT could not learn even with labels:
  # docs/learning_signal.md.)
  background = rng.uniform(*_BACKGROUND_RANGE, 3)
  # Rejection among a fixed number of draws keeps the rng stream deterministic.
  candidates = rng.uniform(*_FOREGROUND_RANGE, (32, 3))
  far = np.linalg.norm(candidates - background, axis=1) >= 0.5
  foreground = candidates[np.argmax(far)]
  pixel_noise = rng.uniform(0.0, 0.03)

  grid = np.arange(size) + 0.5
  centres = start[None, :] + progress[:, None] * move[None, :]  # [N, (x, y)]
  x = (grid[None, None, :] - centres[:, 0, None, None]) / radius
  y = (grid[None, :, None] - centres[:, 1, None, None]) / radius
  # Anti-aliased coverage: one pixel of soft edge.
  alpha = np.clip(0.5 - SHAPES[spec["shape"]](x, y) * radius, 0.0, 1.0)
  alpha = alpha * (_SHAPE_BASE + (1 - _SHAPE_BASE) * intensity[:, None, None])
  image = background + alpha[..., None] * (foreground - background)
  image = image + rng.normal(0.0, pixel_noise, image.shape)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def make_clip(label: int, rng: np.random.Generator, *, clip_seconds: float, sample_rate: int,
              frame_size: int, frames_per_clip: int) -> dict[str, np.ndarray]:
  """Waveform, frames, timestamps and the envelope at those timestamps for one clip."""
  spec = class_spec(label)
  onsets, strengths, decay = _events(spec, rng, clip_seconds)
  num_samples = int(round(clip_seconds * sample_rate))
  env = envelope(np.arange(num_samples) / sample_rate, onsets, strengths, decay)
  pitch = rng.uniform()  # where f0 was drawn before the size followed it: the same audio
  waveform = synth_audio(spec, env, pitch, rng, sample_rate)
  timestamps = (np.arange(frames_per_clip) + 0.5) * clip_seconds / frames_per_clip
  frame_env = envelope(timestamps, onsets, strengths, decay)
  frames = render_frames(spec, frame_env, timestamps / clip_seconds, pitch, rng, frame_size)
  return {"waveform": waveform, "frames": frames, "timestamps": timestamps.astype(np.float32),
          "envelope": frame_env}


def make_synthetic(out_dir: str, *, num_train: int = 2048, num_eval: int = 128, seed: int = 0,
                   num_classes: int = 8, clip_seconds: float = 1.5, sample_rate: int = 16000,
                   mel_bins: int = 64, frame_size: int = 32, frames_per_clip: int = 4,
                   num_shards: int = 4, log_mel: str = "kaldi") -> dict[str, Any]:
  """Writes the synthetic dataset to `out_dir`; returns its dataset_info dict."""
  num_samples = int(round(clip_seconds * sample_rate))
  feats = {
      "sample_rate": sample_rate, "mel_bins": mel_bins, "log_mel": log_mel,
      "frames_per_clip": frames_per_clip, "frame_size": [frame_size, frame_size],
      "video_encoding": "jpeg", "clip_seconds": clip_seconds,
      "audio_frames": features.num_frames(num_samples, sample_rate),
      "frame_length_ms": 25, "frame_shift_ms": 10,
  }
  writer = DatasetWriter(out_dir, name="synthetic", features=feats,
                         label_names=[label_name(c) for c in range(num_classes)])
  sizes = {"train": (num_train, num_shards), "eval": (num_eval, max(1, num_shards // 4))}
  for split in SPLITS:
    count, shards = sizes[split]
    with writer.split(split, num_shards=shards, expected=count) as w:
      for i in range(count):
        label = clip_label(seed, split, i, num_classes)
        clip = make_clip(label, _rng(seed, split, 0, i), clip_seconds=clip_seconds,
                         sample_rate=sample_rate, frame_size=frame_size,
                         frames_per_clip=frames_per_clip)
        w.add(clip_id=f"synthetic-{split}-{i:06d}", source="synthetic", labels=[label],
              log_mel=features.log_mel(clip["waveform"], sample_rate, mel_bins, kind=log_mel),
              frames=clip["frames"], timestamps=clip["timestamps"])
  return writer.finish()


# Flag help; defaults come from make_synthetic's signature, so they are stated once.
_HELP = {
    "num_train": "Clips in the train split.",
    "num_eval": "Clips in the eval split.",
    "seed": "Seed of the per-clip nuisance (classes do not depend on it).",
    "num_classes": "Number of classes.",
    "clip_seconds": "Clip duration in seconds (CAV-MAE: 10).",
    "sample_rate": "Audio sample rate in Hz.",
    "mel_bins": "Log-mel bins (CAV-MAE: 128).",
    "frame_size": "Height and width of the frames (CAV-MAE: 224).",
    "frames_per_clip": "Frames per clip, at evenly spaced timestamps.",
    "num_shards": "Train shards; eval gets max(1, num_shards // 4).",
    "log_mel": f"Log-mel front end, one of {sorted(features.LOG_MEL_FUNCTIONS)}.",
}
_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_flags() -> None:
  """Command-line flags for every make_synthetic argument (only when run as a program, so
  that importing this module defines no flags)."""
  flags.DEFINE_string("out_dir", None, "Dataset directory to write.", required=True)
  for name, param in inspect.signature(make_synthetic).parameters.items():
    if param.kind == param.KEYWORD_ONLY:
      _DEFINE[type(param.default)](name, param.default, _HELP[name])


def main(argv: list[str]) -> None:
  del argv
  started = time.monotonic()
  kwargs = {name: flags.FLAGS[name].value for name in _HELP}
  info = make_synthetic(flags.FLAGS.out_dir, **kwargs)
  counts = {s: v["num_examples"] for s, v in info["splits"].items()}
  print(f"wrote {counts} to {flags.FLAGS.out_dir} in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
