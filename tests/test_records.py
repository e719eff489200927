"""The on-disk format: bit-exact round trips, TensorFlow interop, and errors on bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import simplejpeg

from avmae.data import dataset_info, errors, schema, tfrecord
from avmae.data.source import TFRecordSource
from conftest import make_clip


def _all_records(data_dir, split):
  info = dataset_info.load(data_dir)
  return [r for p in dataset_info.shard_paths(data_dir, info, split)
          for r in tfrecord.iter_records(p)]


def test_round_trip_is_bit_exact(dataset_dir):
  decoded = {}
  for i, data in enumerate(_all_records(dataset_dir, "train")):
    ex = schema.decode_example(data, f"record {i}")
    decoded[ex["clip_id"]] = ex
  assert len(decoded) == 37
  for i in range(37):
    clip, ex = make_clip(i), decoded[f"clip-{i:05d}"]
    np.testing.assert_array_equal(ex["log_mel"], clip["log_mel"].astype(np.float16))
    assert ex["log_mel"].dtype == np.float16
    np.testing.assert_array_equal(ex["labels"], clip["labels"])
    np.testing.assert_array_equal(ex["timestamps"], clip["timestamps"])
    assert ex["source"] == clip["source"]
    # Frames are JPEG: what we read is exactly what the JPEG decoder gives for what we wrote.
    for frame, original in zip(ex["frames"], clip["frames"]):
      jpeg = simplejpeg.encode_jpeg(original, quality=90, colorspace="RGB")
      np.testing.assert_array_equal(frame, simplejpeg.decode_jpeg(jpeg, colorspace="RGB"))


def test_raw_frames_round_trip_exactly():
  clip = make_clip(3)
  ex = schema.decode_example(schema.encode_example(**clip, encoding="raw"), "raw")
  np.testing.assert_array_equal(ex["frames"], clip["frames"])


def test_tensorflow_reads_our_files(dataset_dir):
  tf = pytest.importorskip("tensorflow")
  info = dataset_info.load(dataset_dir)
  paths = dataset_info.shard_paths(dataset_dir, info, "train")
  seen = 0
  for raw in tf.data.TFRecordDataset(paths):
    ex = tf.train.Example.FromString(raw.numpy())
    feat = ex.features.feature
    clip = make_clip(int(feat["clip_id"].bytes_list.value[0].decode().split("-")[1]))
    mel = np.frombuffer(feat["audio/log_mel"].bytes_list.value[0], "<f2").reshape(
        feat["audio/shape"].int64_list.value)
    np.testing.assert_array_equal(mel, clip["log_mel"].astype(np.float16))
    assert list(feat["labels"].int64_list.value) == clip["labels"]
    frame = tf.io.decode_jpeg(feat["video/frames"].bytes_list.value[0]).numpy()
    assert frame.shape == (24, 24, 3)
    seen += 1
  assert seen == info["splits"]["train"]["num_examples"] == 37
  # And a file TensorFlow writes is read by us.
  path = os.path.join(os.path.dirname(paths[0]), "..", "tf_written.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    w.write(schema.encode_example(**make_clip(5)))
  (data,) = list(tfrecord.iter_records(path))
  assert schema.decode_example(data, path)["clip_id"] == "clip-00005"


def test_dataset_info_contents(dataset_dir):
  info = dataset_info.load(dataset_dir)
  assert info["schema_version"] == schema.SCHEMA_VERSION
  assert info["splits"]["train"]["num_examples"] == 37
  assert info["splits"]["eval"]["num_examples"] == 11
  assert len(info["splits"]["train"]["shards"]) == 3
  mels = np.concatenate([make_clip(i)["log_mel"].astype(np.float16).astype(np.float64).ravel()
                         for i in range(37)])
  assert info["log_mel_stats"]["mean"] == pytest.approx(mels.mean(), rel=1e-9)
  assert info["log_mel_stats"]["std"] == pytest.approx(mels.std(), rel=1e-9)
  assert info["label_names"] == [f"class{c}" for c in range(5)]
  assert info["features"]["frames_per_clip"] == 3  # every clip has video
  assert info["splits"]["train"]["num_without_video"] == 0


def test_index_matches_scan_and_rebuilds(dataset_dir):
  info = dataset_info.load(dataset_dir)
  for path in dataset_info.shard_paths(dataset_dir, info, "train"):
    offsets = tfrecord.read_index(path)
    np.testing.assert_array_equal(offsets[:-1], tfrecord.scan_offsets(path))
    assert offsets[-1] == os.path.getsize(path)


@pytest.fixture
def copy_dir(dataset_dir, tmp_path):
  return shutil.copytree(dataset_dir, tmp_path / "copy")


def _shard0(data_dir):
  return os.path.join(data_dir, "train.tfrecord-00000-of-00003")


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def test_crc_mismatch_names_file_record_and_offset(copy_dir):
  shard = _shard0(copy_dir)
  offsets = tfrecord.read_index(shard)
  _flip_byte(shard, int(offsets[2]) + 100)  # inside the data of record 2
  source = TFRecordSource([shard])
  source[1]  # neighbours are fine
  with pytest.raises(errors.CorruptRecordError,
                     match=rf"{shard} record 2 at byte offset {offsets[2]}: CRC mismatch in the "
                     r"record data.*skip_corrupt=True"):
    source[2]
  assert TFRecordSource([shard], skip_corrupt=True)[2].data is None


def test_corrupt_length_header(copy_dir):
  shard = _shard0(copy_dir)
  _flip_byte(shard, int(tfrecord.read_index(shard)[1]) + 3)
  with pytest.raises(errors.CorruptRecordError, match="record 1 .*length header"):
    TFRecordSource([shard])[1]
  with pytest.raises(errors.CorruptRecordError, match="record 1 .*length header"):
    tfrecord.scan_offsets(shard)


def test_truncated_shard(copy_dir):
  shard = _shard0(copy_dir)
  size = os.path.getsize(shard)
  os.truncate(shard, size - 10)
  with pytest.raises(errors.StaleIndexError, match=rf"stale.*{size} bytes.*{size - 10} bytes"):
    TFRecordSource([shard])
  with pytest.raises(errors.TruncatedShardError,
                     match=rf"{shard} record 12 .*needs bytes up to {size}.*has {size - 10}"):
    tfrecord.build_index(shard)
  os.truncate(shard, 5)
  with pytest.raises(errors.TruncatedShardError, match="ends inside a record header"):
    tfrecord.scan_offsets(shard)


def test_missing_and_stale_index(copy_dir):
  shard = _shard0(copy_dir)
  os.remove(tfrecord.index_path(shard))
  with pytest.raises(errors.MissingIndexError,
                     match=rf"no index {shard}.index .*python -m avmae.data.index {copy_dir}"):
    TFRecordSource([shard])
  tfrecord.build_index(shard)  # what the message says to do, as a library call
  assert len(TFRecordSource([shard])) == 13
  with open(shard, "ab") as f:  # shard rewritten (grown) after its index was built
    f.write(tfrecord.frame_record(schema.encode_example(**make_clip(99))))
  with pytest.raises(errors.StaleIndexError, match="stale"):
    TFRecordSource([shard])
  with open(tfrecord.index_path(shard), "r+b") as f:
    f.write(b"garbage!")
  with pytest.raises(errors.StaleIndexError, match="not an avmae index"):
    TFRecordSource([shard])


def test_index_cli_rebuilds_all(copy_dir, capsys):
  from avmae.data import index
  for name in os.listdir(copy_dir):
    if name.endswith(".index"):
      os.remove(os.path.join(copy_dir, name))
  index.main(["index", str(copy_dir)])
  assert "4 shards, 48 records" in capsys.readouterr().out
  assert len(TFRecordSource([_shard0(copy_dir)])) == 13


def test_missing_shard(copy_dir):
  os.remove(_shard0(copy_dir))
  with pytest.raises(errors.MissingShardError, match="does not exist"):
    TFRecordSource([_shard0(copy_dir)])


def test_dataset_info_errors(copy_dir, tmp_path):
  with pytest.raises(errors.SchemaError, match=rf"{tmp_path}/dataset_info.json does not exist"):
    dataset_info.load(str(tmp_path))
  path = os.path.join(copy_dir, dataset_info.FILENAME)
  info = json.load(open(path))
  json.dump({**info, "schema_version": 7}, open(path, "w"))
  with pytest.raises(errors.SchemaError, match="schema version 7, this code reads version 1"):
    dataset_info.load(copy_dir)
  del info["log_mel_stats"]
  json.dump(info, open(path, "w"))
  with pytest.raises(errors.SchemaError, match=r"lacks the keys \['log_mel_stats'\]"):
    dataset_info.load(copy_dir)
  open(path, "w").write("{")
  with pytest.raises(errors.SchemaError, match="not valid JSON"):
    dataset_info.load(copy_dir)


def test_record_schema_errors():
  ex = schema.Example()
  ex.ParseFromString(schema.encode_example(**make_clip(1)))
  ex.features.feature["schema_version"].int64_list.value[0] = 2
  with pytest.raises(errors.SchemaError, match="rec 9: record has schema version"):
    schema.decode_example(ex.SerializeToString(), "rec 9")
  ex.features.feature["schema_version"].int64_list.value[0] = 1
  ex.features.feature["audio/shape"].int64_list.value[0] = 21
  with pytest.raises(errors.SchemaError, match="does not fit audio/shape"):
    schema.decode_example(ex.SerializeToString(), "rec 9")
  del ex.features.feature["audio/shape"]
  with pytest.raises(errors.SchemaError, match="'audio/shape' is missing"):
    schema.decode_example(ex.SerializeToString(), "rec 9")
  with pytest.raises(errors.CorruptRecordError, match="rec 9: not a valid tf.train.Example"):
    schema.decode_example(b"\xff\xff\xff", "rec 9")


@pytest.mark.parametrize("encoding", ["jpeg", "raw"])
def test_record_without_video_decodes_to_no_frames(encoding):
  """data_prep.build --require_video=false stores audio-only clips with frames [0, S, S, 3]."""
  clip = dict(make_clip(4), frames=np.zeros((0, 24, 24, 3), np.uint8),
              timestamps=np.zeros(0, np.float32))
  ex = schema.decode_example(schema.encode_example(**clip, encoding=encoding), "rec 4")
  assert ex["frames"].shape == (0, 24, 24, 3) and ex["frames"].dtype == np.uint8
  assert ex["num_frames"] == 0 and len(ex["frame_indices"]) == 0
  np.testing.assert_array_equal(ex["log_mel"], clip["log_mel"].astype(np.float16))
