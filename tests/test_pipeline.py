"""The grain pipeline: coverage per epoch, invariance to processes and workers, resume, errors."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from avmae import sharding
from avmae.data import augment, dataset_info, errors, pipeline, schema, tfrecord
from configs import data
from conftest import make_clip

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _cfg(data_dir, **overrides):
  cfg = data.get_config(str(data_dir))
  cfg.audio_frames, cfg.image_size = 16, 16
  cfg.update(overrides)
  return cfg


def _batch_source(cfg, split, *, train, seed, global_batch_size, process_index, process_count):
  records, spec = pipeline.open_split(cfg, split, train)
  return pipeline.BatchSource(records, spec, seed, global_batch_size, process_index,
                              process_count)


def _take(batches, n):
  return [jax.tree.map(np.asarray, next(batches)) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("num_frames", [1, 0])  # 0: audio only
def test_each_record_once_per_epoch_across_two_processes(dataset_dir, num_frames):
  cfg = _cfg(dataset_dir, num_frames=num_frames)
  parts = [_batch_source(cfg, "train", train=True, seed=0, global_batch_size=8,
                         process_index=p, process_count=2) for p in range(2)]
  one = _batch_source(cfg, "train", train=True, seed=0, global_batch_size=8, process_index=0,
                      process_count=1)
  stream = []
  for j in range(10):  # 80 positions: epoch 0 (37), epoch 1 (37), the start of epoch 2
    local = [p[j] for p in parts]
    a, b = local[0]["record_index"], local[1]["record_index"]
    assert not set(a) & set(b), "the processes' parts of a global batch overlap"
    merged = {k: np.concatenate([l[k] for l in local]) for k in local[0]}
    _assert_batches_equal([merged], [one[j]])  # 2 processes see the 1-process global batch
    stream.extend(merged["record_index"])
  assert sorted(stream[:37]) == list(range(37))
  assert sorted(stream[37:74]) == list(range(37))
  assert stream[:37] != stream[37:74], "epochs should be shuffled differently"


def test_shuffle_depends_on_seed_only(dataset_dir):
  cfg = _cfg(dataset_dir)
  order = lambda seed: [i for j in range(4) for i in _batch_source(
      cfg, "train", train=True, seed=seed, global_batch_size=8, process_index=0,
      process_count=1)[j]["record_index"]]
  assert order(1) == order(1)
  assert order(1) != order(2)
  assert order(1) != list(range(32))


@pytest.mark.parametrize("workers_before,workers_after", [(0, 0), (2, 2), (2, 0)])
def test_resume_mid_epoch_gives_identical_batches(dataset_dir, workers_before, workers_after):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  kwargs = dict(train=True, seed=5, global_batch_size=8, mesh=mesh)
  with pipeline.Batches(_cfg(dataset_dir), "train", **kwargs) as straight:
    expected = _take(straight, 8)  # crosses the epoch boundary at 37 records
  with pipeline.Batches(_cfg(dataset_dir, num_workers=workers_before), "train", **kwargs) as first:
    _take(first, 3)
    state = first.get_state()
  json.loads(state)  # plain JSON: goes into an orbax checkpoint as is
  with pipeline.Batches(_cfg(dataset_dir, num_workers=workers_after), "train",
                        **kwargs) as resumed:
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 5), expected[3:])


def test_worker_count_does_not_change_batches(dataset_dir):
  got = []
  for workers in (0, 1, 2):
    with pipeline.Batches(_cfg(dataset_dir, num_workers=workers), "train", train=True, seed=4,
                          global_batch_size=8) as b:
      got.append(_take(b, 3))
  _assert_batches_equal(got[0], got[1])
  _assert_batches_equal(got[0], got[2])


def test_global_arrays_sharded_over_batch_axes(dataset_dir):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with pipeline.Batches(_cfg(dataset_dir), "train", train=True, seed=0, global_batch_size=8,
                        mesh=mesh) as b:
    batch = next(b)
  assert batch["audio"].shape == (8, 16, 16)
  assert batch["audio"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert {s.data.shape for s in batch["audio"].addressable_shards} == {(2, 16, 16)}
  with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the 4 devices along "
                     r"the mesh's batch axes \('data', 'fsdp'\)"):
    pipeline.Batches(_cfg(dataset_dir), "train", train=True, seed=0, global_batch_size=6,
                     mesh=mesh)


def _two_processes(dataset_dir, out, layout):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": os.path.dirname(TESTS_DIR)}
  procs = [subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "pipeline_process.py"),
                             str(i), "2", str(port), dataset_dir, str(out), layout], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)


def _one_process_batches(dataset_dir, n):
  with pipeline.Batches(_cfg(dataset_dir), "train", train=True, seed=3,
                        global_batch_size=8) as b:
    return _take(b, n)


def test_two_real_processes_read_the_single_process_batches(dataset_dir, tmp_path):
  out = tmp_path / "two.npz"
  _two_processes(dataset_dir, out, "data")
  two = np.load(out)
  for step, batch in enumerate(_one_process_batches(dataset_dir, 6)):
    for key, value in batch.items():
      np.testing.assert_array_equal(two[f"{key}_{step}"], value, err_msg=f"{key} step {step}")


def test_a_tensor_axis_across_processes_gives_every_replica_the_same_rows(dataset_dir, tmp_path):
  """Mesh {"data": 4, "fsdp": 1, "tensor": 2} with tensor replica t on process t: each
  process's devices hold the whole batch (split over data only), so each process reads all 8
  rows; every device's shard is those rows of the 1-process batch, on both replicas."""
  _two_processes(dataset_dir, tmp_path / "two", "tensor_across")
  parts = [np.load(tmp_path / f"two.{p}.npz") for p in range(2)]
  for step, batch in enumerate(_one_process_batches(dataset_dir, 6)):
    for p, part in enumerate(parts):
      covered = set()
      for name in part.files:
        if not name.startswith(f"rows_{step}_"):
          continue
        device = name.split("_")[-1]
        lo, hi = part[name]
        assert hi - lo == 2, (lo, hi)  # 8 rows over the 4 data shards
        covered |= set(range(lo, hi))
        for key, value in batch.items():
          np.testing.assert_array_equal(part[f"{key}_{step}_{device}"], value[lo:hi],
                                        err_msg=f"process {p} {device} {key} step {step}")
      assert covered == set(range(8)), f"process {p} holds rows {sorted(covered)}"
  assert [int(part["num_skipped"]) for part in parts] == [0, 0]


def test_eval_reads_in_order_once_with_padding(dataset_dir):
  with pipeline.Batches(_cfg(dataset_dir), "eval", train=False, seed=0,
                        global_batch_size=4) as b:
    batches = list(b)
  assert len(batches) == 3
  index = np.concatenate([x["record_index"] for x in batches])
  valid = np.concatenate([x["valid"] for x in batches])
  np.testing.assert_array_equal(index, list(range(11)) + [-1])
  np.testing.assert_array_equal(valid, [True] * 11 + [False])
  assert not np.any(batches[-1]["audio"][-1])


def test_example_contents(dataset_dir):
  info = dataset_info.load(dataset_dir)
  mean, std = info["log_mel_stats"]["mean"], info["log_mel_stats"]["std"]
  with pipeline.Batches(_cfg(dataset_dir, audio_frames=32, image_size=24), "eval", train=False,
                        seed=0, global_batch_size=11) as b:
    batch = next(b)
  for row, i in enumerate(range(37, 48)):
    clip = make_clip(i)
    mel = np.pad(clip["log_mel"].astype(np.float16).astype(np.float32), ((0, 12), (0, 0)))
    np.testing.assert_allclose(batch["audio"][row], (mel - mean) / std, rtol=1e-6, atol=1e-6)
    # Evaluation uses the middle frame (index 1 of 3); JPEG is lossy.
    assert batch["frames"].dtype == np.uint8
    pixels = batch["frames"][row].astype(np.float32)
    assert np.abs(pixels - clip["frames"][1]).mean() < 12
    assert np.abs(pixels - clip["frames"][0]).mean() > 40
    np.testing.assert_array_equal(np.flatnonzero(batch["labels"][row]), clip["labels"])
  with pipeline.Batches(_cfg(dataset_dir, all_frames=True), "eval", train=False, seed=0,
                        global_batch_size=2) as b:
    assert next(b)["frames"].shape == (2, 3, 16, 16, 3)


def test_training_samples_a_random_frame(dataset_dir):
  cfg = _cfg(dataset_dir, image_size=24)
  cfg.augment.time_roll = False
  source = _batch_source(cfg, "train", train=True, seed=0, global_batch_size=37,
                         process_index=0, process_count=1)
  picked = []
  for j in range(4):  # positions of the same record in 4 epochs
    batch = source[j]
    row = list(batch["record_index"]).index(0)
    pixels = batch["frames"][row].astype(np.float32)
    picked.append(int(np.argmin([np.abs(pixels - f).mean() for f in make_clip(0)["frames"]])))
  assert len(set(picked)) > 1, picked


def test_audio_only_batches_are_the_batches_without_frames(dataset_dir):
  """data.num_frames=0 on a dataset with video: no "frames" in any batch (padding included),
  everything else as with frames."""
  def eval_batches(num_frames):
    with pipeline.Batches(_cfg(dataset_dir, num_frames=num_frames), "eval", train=False,
                          seed=0, global_batch_size=4) as b:
      return list(b)
  audio_only, with_frames = eval_batches(0), eval_batches(1)
  assert len(audio_only) == 3 and not audio_only[-1]["valid"][-1]  # the last one padded
  for batch in with_frames:
    del batch["frames"]
  _assert_batches_equal(audio_only, with_frames)
  assert sorted(pipeline.first_examples(_cfg(dataset_dir, num_frames=0), "eval", 2)) == [
      "audio", "labels", "record_index", "valid"]


def test_audio_only_resume_gives_identical_sharded_batches(dataset_dir):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  kwargs = dict(train=True, seed=5, global_batch_size=16, mesh=mesh)
  cfg = _cfg(dataset_dir, num_frames=0)
  with pipeline.Batches(cfg, "train", **kwargs) as straight:
    expected = _take(straight, 4)  # crosses the epoch boundary at 37 records
  with pipeline.Batches(cfg, "train", **kwargs) as first:
    _take(first, 2)
    state = first.get_state()
  with pipeline.Batches(cfg, "train", **kwargs) as resumed:
    resumed.set_state(state)
    batch = next(resumed)
    assert batch["audio"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    _assert_batches_equal([jax.tree.map(np.asarray, batch)] + _take(resumed, 1), expected[2:])
  assert sorted(expected[0]) == ["audio", "labels", "record_index", "valid"]


def test_frame_settings_are_checked(dataset_dir):
  with pytest.raises(ValueError, match=r"num_frames=-1 must be at least 0 \(0: audio only\)"):
    pipeline.Batches(_cfg(dataset_dir, num_frames=-1), "eval", train=False, seed=0,
                     global_batch_size=4)
  with pytest.raises(ValueError, match="all_frames=True takes every frame; it excludes "
                     "data.num_frames=0"):
    pipeline.Batches(_cfg(dataset_dir, num_frames=0, all_frames=True), "eval", train=False,
                     seed=0, global_batch_size=4)


def _corrupt(data_dir, shard, records):
  path = os.path.join(data_dir, shard)
  offsets = tfrecord.read_index(path)
  with open(path, "r+b") as f:
    for r in records:
      f.seek(int(offsets[r]) + 200)
      f.write(b"\x00" * 8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_record_fails_or_is_skipped_and_counted(dataset_dir, tmp_path, num_workers):
  data_dir = shutil.copytree(dataset_dir, tmp_path / "d")
  _corrupt(data_dir, "train.tfrecord-00001-of-00003", [0, 4])  # global records 13 and 17
  kwargs = dict(train=True, seed=0, global_batch_size=37)  # one batch is one epoch
  with pipeline.Batches(_cfg(data_dir, num_workers=num_workers), "train", **kwargs) as b:
    with pytest.raises(errors.CorruptRecordError,
                       match=r"train.tfrecord-00001-of-00003 record 0 at byte offset 0: CRC"):
      next(b)
  with pipeline.Batches(_cfg(data_dir, num_workers=num_workers, skip_corrupt=True), "train",
                        **kwargs) as b:
    batch = next(b)
    assert b.num_skipped == 2
    invalid = ~batch["valid"]
    assert invalid.sum() == 2
    assert sorted(batch["record_index"][invalid]) == [13, 17]
    next(b)
    assert b.num_skipped == 4  # counted again in the next epoch
    state = b.get_state()
  with pipeline.Batches(_cfg(data_dir, skip_corrupt=True), "train", **kwargs) as b:
    b.set_state(state)
    assert b.num_skipped == 4


def test_record_shape_must_match_dataset_info(dataset_dir, tmp_path):
  data_dir = shutil.copytree(dataset_dir, tmp_path / "d")
  path = os.path.join(data_dir, dataset_info.FILENAME)
  info = json.load(open(path))
  info["features"]["mel_bins"] = 128
  json.dump(info, open(path, "w"))
  with pipeline.Batches(_cfg(data_dir), "eval", train=False, seed=0, global_batch_size=4) as b:
    with pytest.raises(errors.SchemaError, match=r"eval.tfrecord-00000-of-00001 record 0 at byte "
                       r"offset 0: record has log-mel \(20, 16\).* says 128 mel bins"):
      next(b)


def test_unknown_split_is_named(dataset_dir):
  with pytest.raises(errors.SchemaError, match=r"has no split 'test'; it has \['eval', 'train'\]"):
    pipeline.Batches(_cfg(dataset_dir), "test", train=False, seed=0, global_batch_size=4)


def test_augmentations_are_pure_and_do_what_they_say():
  rng = lambda: np.random.default_rng(7)
  mel = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
  rolled = augment.time_roll(mel, rng())
  np.testing.assert_array_equal(rolled, augment.time_roll(mel, rng()))
  shift = [s for s in range(-50, 50) if np.array_equal(np.roll(mel, s, 0), rolled)]
  assert shift and shift[0] != 0
  masked = augment.spec_augment(mel, rng(), max_freq=4, max_time=10)
  zero_cols = np.flatnonzero((masked == 0).all(axis=0))
  zero_rows = np.flatnonzero((masked == 0).all(axis=1))
  assert 0 < len(zero_cols) <= 4 and 0 < len(zero_rows) <= 10
  unmasked = np.ones_like(mel, bool)
  unmasked[:, zero_cols] = unmasked[zero_rows] = False
  np.testing.assert_array_equal(masked[unmasked], mel[unmasked])
  noise = augment.add_noise(mel, rng(), 0.5) - mel
  assert 0 < noise.min() and noise.max() < 0.5 and np.std(noise) > 0
  image = np.random.default_rng(1).integers(0, 256, (40, 30, 3)).astype(np.uint8)
  crop = augment.random_resized_crop(image, rng(), (16, 16))
  assert crop.shape == (16, 16, 3) and crop.dtype == np.float32
  np.testing.assert_array_equal(crop, augment.random_resized_crop(image, rng(), (16, 16)))
  np.testing.assert_allclose(augment.resize_bilinear(image, (40, 30)), image)
  np.testing.assert_allclose(augment.resize_bilinear(image, (20, 15))[3, 4],
                             image[6:8, 8:10].mean(axis=(0, 1)), rtol=1e-5)
  flips = {augment.random_flip(image, np.random.default_rng(s))[0, 0, 0] for s in range(20)}
  assert flips == {image[0, 0, 0], image[0, -1, 0]}
  np.testing.assert_allclose(augment.crop_or_pad(mel, 60)[50:], 0)
  np.testing.assert_array_equal(augment.crop_or_pad(mel, 20), mel[:20])


def test_in_place_log_mel_ops_give_the_numbers_of_the_plain_expressions():
  """normalize_log_mel and add_noise work in place for speed (experiments/benchmarks/
  input_pipeline.py); the records they make are bit for bit those of the expressions."""
  mel = np.random.default_rng(0).standard_normal((300, 128)).astype(np.float16) * 4 - 5
  expected = ((mel.astype(np.float32) - -4.27) / 4.57).astype(np.float32)
  got = augment.normalize_log_mel(mel, -4.27, 4.57)
  assert got.dtype == np.float32 and np.array_equal(got, expected)
  plain_rng, rng = np.random.default_rng(3), np.random.default_rng(3)
  scale = plain_rng.random() * 0.1
  expected = (got + scale * plain_rng.random(got.shape)).astype(np.float32)
  noisy = augment.add_noise(got, rng, 0.1)
  assert noisy.dtype == np.float32 and np.array_equal(noisy, expected)
  assert np.array_equal(got, augment.normalize_log_mel(mel, -4.27, 4.57))  # input untouched


def _reference_audio(raw, position: int, seed: int, cfg, info, train: bool):
  """The per-record audio transform before data.audio_on_device (kept here as the reference):
  float32, crop or pad, (x - mean) / std, then in training np.roll by the record RNG's draw
  after the frame's (one frame of 3: integers(3), then integers(-T, T))."""
  mean, std = info["log_mel_stats"]["mean"], info["log_mel_stats"]["std"]
  mel = schema.decode_example(raw.data, raw.where)["log_mel"].astype(np.float32)
  t = cfg.audio_frames
  mel = np.pad(mel, ((0, max(t - len(mel), 0)), (0, 0)))[:t]
  audio = ((mel - np.float32(mean)) / np.float32(std)).astype(np.float32)
  if not train:
    return audio
  rng = np.random.default_rng([seed, position])
  rng.integers(3)  # the frame
  return np.roll(audio, int(rng.integers(-t, t)), axis=0)


@pytest.mark.parametrize("audio_frames", [16, 32])  # crop, pad
def test_audio_finished_on_the_device_is_the_reference_transform(dataset_dir, audio_frames):
  """data.audio_on_device (float16 shipped, finished in one jitted call on the sharded batch)
  gives the batches of the host path and of the reference transform, bit for bit on CPU:
  training (time roll over an epoch boundary), evaluation (padding rows stay zeros)."""
  info = dataset_info.load(dataset_dir)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  for split, train, n in (("train", True, 6), ("eval", False, 2)):
    kwargs = dict(train=train, seed=7, global_batch_size=8)
    got = {}
    for name, on_device, m in (("host", False, None), ("device", True, mesh),
                               ("numpy", True, None)):
      cfg = _cfg(dataset_dir, audio_frames=audio_frames, audio_on_device=on_device)
      with pipeline.Batches(cfg, split, mesh=m, **kwargs) as b:
        got[name] = _take(b, n)
        # What travels through grain: float16 as stored, with a mesh and audio_on_device.
        assert b.source[0]["audio"].dtype == (np.float16 if name == "device" else np.float32)
    _assert_batches_equal(got["device"], got["host"])
    _assert_batches_equal(got["numpy"], got["host"])
    records, _ = pipeline.open_split(cfg, split, train)
    for j, batch in enumerate(got["device"]):
      assert batch["audio"].dtype == np.float32
      for row, record in enumerate(batch["record_index"]):
        expected = (_reference_audio(records[record], j * 8 + row, 7, cfg, info, train)
                    if batch["valid"][row] else np.zeros_like(batch["audio"][row]))
        np.testing.assert_array_equal(batch["audio"][row], expected, err_msg=f"{j} {row}")


def test_the_host_keeps_the_audio_augmentations_drawing_per_element(dataset_dir):
  """Noise, roll + gain and SpecAugment stay on the host (their numbers come from the record's
  RNG): the batches are those of audio_on_device=False."""
  for augment in ({"noise": 0.1}, {"roll_gain": True}, {"freq_mask": 4, "time_mask": 4}):
    batches = []
    for on_device in (False, True):
      cfg = _cfg(dataset_dir, audio_on_device=on_device)
      cfg.augment.update(augment)
      with pipeline.Batches(cfg, "train", train=True, seed=2, global_batch_size=8,
                            mesh=sharding.make_mesh({"data": -1, "fsdp": 1})) as b:
        batches.append(_take(b, 2))
    _assert_batches_equal(*batches)


@pytest.mark.parametrize("train", [True, False])
def test_frames_decoded_into_the_batch_are_the_records_frames(dataset_dir, train):
  """Frames that need no resize are decoded straight into the batch's rows: each row is the
  record's chosen frame (training: the RNG's first draw; evaluation: the middle one)."""
  cfg = _cfg(dataset_dir, image_size=24)  # the stored frame size: no resize
  split = "train" if train else "eval"
  source = _batch_source(cfg, split, train=train, seed=5, global_batch_size=8,
                         process_index=0, process_count=1)
  records, _ = pipeline.open_split(cfg, split, train)
  for j in range(2):
    batch = source[j]
    for row, record in enumerate(batch["record_index"]):
      if record < 0:
        continue
      frames = schema.decode_example(records[record].data, "")["frames"]
      chosen = np.random.default_rng([5, j * 8 + row]).integers(3) if train else 1
      np.testing.assert_array_equal(batch["frames"][row], frames[chosen], err_msg=f"{j} {row}")
