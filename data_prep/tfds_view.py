"""A TensorFlow Datasets view of an avmae dataset, for tf.data users:

    python -m data_prep.tfds_view DIR        (data_prep.build writes it by default)
    builder = tfds.builder_from_directory("DIR/tfds"); ds = builder.as_dataset(split="train")

TFDS wants its own dataset_info.json, so its metadata lives in DIR/tfds/ and its file
template points at the shards in DIR (`../train.tfrecord-00000-of-00016`): nothing is copied.
Features decode as: labels (ClassLabel ids), video/frames (uint8 [N, H, W, 3]), audio/log_mel
(raw bytes: `tf.reshape(tf.io.decode_raw(x, tf.float16), audio/shape)`). TensorFlow is
imported here only: this is interop, not the training path.
"""

from __future__ import annotations

import os
import sys

from avmae.data import dataset_info, schema, tfrecord

SUBDIR = "tfds"


def write(data_dir: str) -> str:
  """Writes DIR/tfds/{dataset_info.json, features.json}; returns that directory."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf
  import tensorflow_datasets as tfds

  info = dataset_info.load(data_dir)
  height, width = info["features"]["frame_size"]
  f = tfds.features
  features = f.FeaturesDict({
      "schema_version": f.Tensor(shape=(), dtype=tf.int64),
      "clip_id": f.Text(),
      "source": f.Text(),
      "labels": f.Sequence(f.ClassLabel(names=info["label_names"])),
      "audio": f.FeaturesDict({"log_mel": f.Tensor(shape=(), dtype=tf.string),
                               "shape": f.Tensor(shape=(2,), dtype=tf.int64)}),
      "video": f.FeaturesDict({
          "frames": f.Sequence(f.Image(shape=(height, width, 3), encoding_format="jpeg")),
          "encoding": f.Text(),
          "shape": f.Tensor(shape=(4,), dtype=tf.int64),
          "timestamps": f.Sequence(f.Scalar(dtype=tf.float32))}),
  })
  out = os.path.join(data_dir, SUBDIR)
  os.makedirs(out, exist_ok=True)
  splits = []
  for split, meta in info["splits"].items():
    paths = dataset_info.shard_paths(data_dir, info, split)
    template = tfds.core.ShardedFileTemplate(
        data_dir=tfds.core.Path(out), template="../{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=info["name"], split=split, filetype_suffix="tfrecord")
    splits.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[len(tfrecord.read_index(p)) - 1 for p in paths],
        num_bytes=sum(os.path.getsize(p) for p in paths), filename_template=template))
  identity = tfds.core.DatasetIdentity(name=info["name"], version=f"{schema.SCHEMA_VERSION}.0.0",
                                       data_dir=out, module_name="avmae")
  tfds.core.DatasetInfo(builder=identity, features=features,
                        split_dict=tfds.core.SplitDict(splits)).write_to_directory(out)
  return out


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m data_prep.tfds_view DATASET_DIR")
  print(f"wrote {write(sys.argv[1])}")
