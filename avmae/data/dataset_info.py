"""`dataset_info.json`: what a dataset directory holds, checked before anything is read."""

from __future__ import annotations

import json
import os
from typing import Any

from avmae.data import errors
from avmae.data.schema import SCHEMA_VERSION

FILENAME = "dataset_info.json"
REQUIRED_KEYS = ("schema_version", "features", "splits", "label_names", "log_mel_stats")
REQUIRED_FEATURES = ("sample_rate", "mel_bins", "log_mel", "frames_per_clip", "frame_size",
                     "video_encoding")


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}.tfrecord-{index:05d}-of-{count:05d}"


def save(data_dir: str, info: dict[str, Any]) -> None:
  tmp = os.path.join(data_dir, FILENAME + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(data_dir, FILENAME))


def load(data_dir: str) -> dict[str, Any]:
  """Reads and validates dataset_info.json of `data_dir`."""
  if "://" in str(data_dir):  # a str or a pathlib.Path
    raise errors.SchemaError(
        f"data.dir={data_dir!r}: a dataset on a bucket is read through a local mount. Mount "
        "it with gcsfuse (`python experiments/launch/tpu_vm.py install --gcsfuse_bucket="
        "BUCKET --mount_point=/mnt/data` mounts it on every worker) and set data.dir to the "
        "path under the mount point")
  path = os.path.join(data_dir, FILENAME)
  if not os.path.exists(path):
    raise errors.SchemaError(
        f"{path} does not exist: {data_dir!r} is not an avmae dataset directory. Make one with "
        "`python -m data_prep.make_synthetic --out_dir DIR` or data_prep from videos.")
  try:
    with open(path) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise errors.SchemaError(f"{path} is not valid JSON ({e})") from e
  missing = [k for k in REQUIRED_KEYS if k not in info]
  if missing:
    raise errors.SchemaError(f"{path} lacks the keys {missing}")
  if info["schema_version"] != SCHEMA_VERSION:
    raise errors.SchemaError(
        f"{path} has schema version {info['schema_version']}, this code reads version "
        f"{SCHEMA_VERSION}: regenerate the dataset with this version's data_prep.")
  missing = [k for k in REQUIRED_FEATURES if k not in info["features"]]
  if missing:
    raise errors.SchemaError(f"{path}: 'features' lacks the keys {missing}")
  return info


# config.data.log_mel_norm -> (mean, std) the log-mel is normalised with, as (x - mean) / std.
# "dataset": the training split's own statistics (log_mel_stats); "dataset_x2": the same with
# the std doubled (Audio-MAE's and AST's scale); or an official recipe's fixed AudioSet
# constants (Audio-MAE main_pretrain.py norm_stats, std doubled in its dataset.py; CAV-MAE
# run_cavmae_pretrain_base.sh).
LOG_MEL_NORMS = {
    "dataset": lambda stats: (stats["mean"], stats["std"]),
    "dataset_x2": lambda stats: (stats["mean"], 2 * stats["std"]),
    "audioset_audio_mae": lambda stats: (-4.2677393, 2 * 4.5689974),
    "audioset_cav_mae": lambda stats: (-5.081, 4.4849),
}


def log_mel_norm(info: dict[str, Any], name: str) -> tuple[float, float]:
  """(mean, std) of `LOG_MEL_NORMS[name]` for the dataset of `info`."""
  if name not in LOG_MEL_NORMS:
    raise ValueError(f"config.data.log_mel_norm={name!r}; one of {sorted(LOG_MEL_NORMS)}")
  mean, std = LOG_MEL_NORMS[name](info["log_mel_stats"])
  return float(mean), float(std)


def num_without_video(info: dict[str, Any], split: str) -> int:
  """Clips of `split` stored with no frames (data_prep.build --require_video=false)."""
  # Datasets written before this count was kept have none, unless built from audio-only
  # files; reading frames of those still fails at the record, naming it.
  return info["splits"][split].get("num_without_video", 0)


def has_video(info: dict[str, Any]) -> bool:
  """False for an audio-only dataset: no clip of any split has frames (frames_per_clip 0)."""
  return info["features"]["frames_per_clip"] > 0


def shard_paths(data_dir: str, info: dict[str, Any], split: str) -> list[str]:
  if split not in info["splits"]:
    raise errors.SchemaError(f"{os.path.join(data_dir, FILENAME)} has no split {split!r}; it "
                             f"has {sorted(info['splits'])}")
  return [os.path.join(data_dir, name) for name in info["splits"][split]["shards"]]
