"""Per-example augmentations and input shaping: pure NumPy functions of (array, rng, params).

They run in grain worker processes, on one example at a time, before batching. Each takes the
`np.random.Generator` grain seeds from (seed, element index), so results do not depend on the
number of workers or processes.
"""

from __future__ import annotations

import numpy as np

# CAV-MAE normalises frames with the ImageNet statistics.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], np.float32)


def crop_or_pad(log_mel: np.ndarray, num_frames: int, out: np.ndarray | None = None
                ) -> np.ndarray:
  """First `num_frames` frames, zero-padded at the end (as the official loaders do); written
  into `out` when given (a batch's row), else a view or a new array."""
  t = min(log_mel.shape[0], num_frames)
  if out is None:
    if t == num_frames:
      return log_mel[:num_frames]
    out = np.empty((num_frames, *log_mel.shape[1:]), log_mel.dtype)  # np.pad's, at a tenth
  out[:t] = log_mel[:t]
  out[t:] = 0
  return out


def normalize_log_mel(log_mel: np.ndarray, mean: float, std: float) -> np.ndarray:
  """(log_mel - mean) / std in float32, in place on one float32 copy (the same numbers as
  the expression, without its temporaries: a 1024 x 128 record is 0.5 MB)."""
  out = log_mel.astype(np.float32)  # always a copy
  np.subtract(out, np.float32(mean), out=out)
  return np.divide(out, np.float32(std), out=out)


def roll_shift(num_frames: int, rng: np.random.Generator) -> int:
  """The time roll's shift: uniform in [-num_frames, num_frames) (CAV-MAE's audio roll)."""
  return int(rng.integers(-num_frames, num_frames))


def time_roll(log_mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Circular shift along time by `roll_shift` (np.roll's direction)."""
  return np.roll(log_mel, roll_shift(log_mel.shape[0], rng), axis=0)


def roll_gain(log_mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Audio-MAE's `_roll_mag_aug` carried to the log-mel: official rolls the waveform by a
  uniform [0, samples) and scales it by m ~ Beta(10, 10) + 0.5 before the fbank; here the clip's
  frames roll by a uniform [0, frames) and 2 ln m is added (the power spectrum scales by m^2;
  only bins at Kaldi's log floor differ, which official leaves at the floor)."""
  shift = int(rng.integers(log_mel.shape[0]))
  gain = 2.0 * np.log(rng.beta(10.0, 10.0) + 0.5)
  return np.roll(log_mel.astype(np.float32), shift, axis=0) + np.float32(gain)


def add_noise(log_mel: np.ndarray, rng: np.random.Generator, max_scale: float) -> np.ndarray:
  """Adds uniform [0, 1) noise times a scale drawn uniformly from [0, max_scale) (CAV-MAE's
  noise augmentation, whose max_scale is 0.1, on the normalised log-mel)."""
  scale = rng.random() * max_scale
  noise = rng.random(log_mel.shape)  # float64, as the sum: in place, the same numbers
  noise *= scale
  noise += log_mel
  return noise.astype(np.float32)


def spec_augment(log_mel: np.ndarray, rng: np.random.Generator, max_freq: int,
                 max_time: int) -> np.ndarray:
  """Zeroes one band of up to `max_freq` mel bins and one span of up to `max_time` frames
  (torchaudio's FrequencyMasking/TimeMasking, applied after normalisation so 0 is the mean)."""
  out = log_mel.copy()
  for axis, max_width in ((1, max_freq), (0, max_time)):
    if max_width > 0:
      width = int(rng.integers(0, min(max_width, out.shape[axis]) + 1))
      start = int(rng.integers(0, out.shape[axis] - width + 1))
      index = [slice(None)] * 2
      index[axis] = slice(start, start + width)
      out[tuple(index)] = 0.0
  return out


def resize_bilinear(image: np.ndarray, size: tuple[int, int],
                    box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear resize of the `box` (top, left, height, width; default all) of an HWC image.

  Returns float32, or the image itself when there is nothing to do."""
  top, left, height, width = box or (0.0, 0.0, *image.shape[:2])
  if box is None and image.shape[:2] == tuple(size):
    return image
  out_h, out_w = size
  # Sample at pixel centres, as align_corners=False does.
  ys = top + (np.arange(out_h) + 0.5) * height / out_h - 0.5
  xs = left + (np.arange(out_w) + 0.5) * width / out_w - 0.5
  ys = np.clip(ys, 0, image.shape[0] - 1)
  xs = np.clip(xs, 0, image.shape[1] - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, image.shape[0] - 1), np.minimum(x0 + 1, image.shape[1] - 1)
  wy = (ys - y0).astype(np.float32)[:, None, None]
  wx = (xs - x0).astype(np.float32)[None, :, None]
  img = image.astype(np.float32)
  top_row = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
  bottom_row = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
  return top_row * (1 - wy) + bottom_row * wy


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: tuple[int, int],
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (area fraction in `scale`, aspect in `ratio`), resized to `size`."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    crop_w, crop_h = np.sqrt(area * aspect), np.sqrt(area / aspect)
    if crop_w <= w and crop_h <= h:
      top, left = rng.uniform(0, h - crop_h), rng.uniform(0, w - crop_w)
      return resize_bilinear(image, size, (top, left, crop_h, crop_w))
  return resize_bilinear(image, size)  # no valid crop found: the whole image, as torchvision


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Rounds a float image back to uint8 (as a PIL resize would): batches carry uint8 frames,
  4x fewer bytes to pickle and transfer, and are normalised on the device."""
  if image.dtype == np.uint8:
    return image
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def normalize_image(image):
  """uint8 RGB -> float32 normalised with the ImageNet statistics; NumPy or JAX arrays (the
  train step normalises on the device)."""
  return (image.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
