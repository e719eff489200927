"""data_prep.build end to end on real media made with PyAV: counts, failures, record contents,
resume after a kill, Beam DirectRunner = local run, tfds interop, and training on the result."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jax
from avmae import sharding
from avmae.data import augment, dataset_info, errors, features, pipeline, schema, tfrecord
from configs import data
from data_prep import build, manifests, media, verify
from data_prep import inspect as inspect_tool
from data_prep import media_factory

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTIONS = build.BuildOptions(mel_bins=64, num_frames=4, frame_size=32, min_seconds=1.0)
AAC_STEREO = dict(rate=44100, channels=2, codec="aac")
AAC_MONO_8K = dict(rate=8000, channels=1, codec="aac")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
  """Folders are labels. Four good clips and five that must fail, each for its own reason."""
  root = tmp_path_factory.mktemp("media")
  for label in ("dogs", "cats", "birds"):
    (root / label).mkdir()
  w = media_factory.write_video
  w(str(root / "dogs" / "a_h264.mp4"), seconds=3.0, codec="h264", audio=AAC_STEREO)
  w(str(root / "dogs" / "b_mpeg4.mp4"), seconds=2.5, codec="mpeg4", audio=AAC_MONO_8K)
  w(str(root / "cats" / "c_vfr.mp4"), seconds=3.0, codec="h264", audio=AAC_STEREO,
    variable_frame_rate=True)
  w(str(root / "cats" / "d_silent.mp4"), seconds=2.0, codec="h264")
  media_factory.write_audio(str(root / "birds" / "e_audio.m4a"), seconds=2.0, rate=8000,
                            codec="aac")
  media_factory.zero_byte(str(root / "birds" / "f_empty.mp4"))
  w(str(root / "birds" / "g_full.mkv"), seconds=3.0, codec="mpeg4", audio=AAC_STEREO)
  media_factory.truncate(str(root / "birds" / "g_full.mkv"), str(root / "birds" / "h_cut.mkv"),
                         0.3)
  w(str(root / "cats" / "i_short.mp4"), seconds=0.6, codec="h264", audio=AAC_STEREO)
  return str(root)


EXPECTED_FAILURES = {"cats/d_silent": "no_audio", "birds/e_audio": "no_video",
                     "birds/f_empty": "empty", "cats/i_short": "too_short"}


def _run_build(args, **kw):
  return subprocess.run([sys.executable, "-m", "data_prep.build", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, **kw)


def _shard_bytes(data_dir):
  return {n: pathlib.Path(data_dir, n).read_bytes() for n in sorted(os.listdir(data_dir))
          if ".tfrecord-" in n}


@pytest.fixture(scope="module")
def built(media_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("built"))
  result = _run_build([f"--media_dir={media_dir}", f"--out_dir={out}", "--num_shards=3",
                       "--num_workers=2", "--mel_bins=64", "--num_frames=4", "--frame_size=32"])
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_counts_and_failures(built):
  out, result = built
  info = dataset_info.load(out)
  failures = [json.loads(l) for l in open(os.path.join(out, "failures.jsonl"))]
  by_clip = {f["clip_id"]: f["reason"] for f in failures}
  for clip, reason in EXPECTED_FAILURES.items():
    assert by_clip.pop(clip) == reason, (clip, failures)
  assert list(by_clip) == ["birds/h_cut"] and by_clip["birds/h_cut"] in ("truncated", "corrupt")
  assert info["splits"]["train"]["num_examples"] == 9 - len(failures) == 4
  assert info["failures"]["total"] == 5
  assert info["label_names"] == ["birds", "cats", "dogs"]
  assert "[build] 9/9 clips" in result.stderr and "clips/s" in result.stderr
  assert verify.verify(out, log=lambda _: None) == []


def test_records_hold_the_decoded_media(built, media_dir):
  out, _ = built
  info = dataset_info.load(out)
  records = {}
  for path in dataset_info.shard_paths(out, info, "train"):
    for i, data in enumerate(tfrecord.iter_records(path)):
      ex = schema.decode_example(data, f"{path} {i}")
      records[ex["clip_id"]] = ex
  assert sorted(records) == ["birds/g_full", "cats/c_vfr", "dogs/a_h264", "dogs/b_mpeg4"]
  for clip_id, ex in records.items():
    path = os.path.join(media_dir, clip_id + (".mkv" if clip_id.startswith("birds") else ".mp4"))
    decoded = media.decode_clip(path, None, None, OPTIONS.decode_options())
    expected = features.log_mel(decoded.waveform, 16000, 64)
    np.testing.assert_array_equal(ex["log_mel"], expected.astype(np.float16))
    np.testing.assert_allclose(ex["timestamps"], decoded.timestamps, atol=1e-6)
    assert ex["frames"].shape == (4, 32, 32, 3)
    assert info["label_names"][ex["labels"][0]] == clip_id.split("/")[0]
  # Frames show the right moments: 3 s at 25 fps, timestamps (i + 0.5) * 3 / 4.
  ex = records["dogs/a_h264"]
  np.testing.assert_allclose(ex["timestamps"], [0.375, 1.125, 1.875, 2.625], atol=1e-6)
  shown = [media_factory.frame_index(np.asarray(media.resize_and_crop(f, 32))) for f in
           ex["frames"]]
  assert all(abs(s - int(t * 25)) <= 1 for s, t in zip(shown, ex["timestamps"])), shown


def _plain_manifest(tmp_path, media_dir, copies):
  rows = ["path,labels,clip_id"]
  rows += [f"dogs/a_h264.mp4,dogs,copy{i:03d}" for i in range(copies)]
  path = tmp_path / "list.csv"
  path.write_text("\n".join(rows) + "\n")
  return str(path)


def test_resume_after_kill_gives_the_same_bytes(media_dir, tmp_path):
  manifest = _plain_manifest(tmp_path, media_dir, 24)
  common = [f"--manifest={manifest}", f"--media_root={media_dir}", "--num_shards=8",
            "--mel_bins=64", "--num_frames=4", "--frame_size=32", "--tfds=false"]
  reference = str(tmp_path / "reference")
  assert _run_build(common + [f"--out_dir={reference}"]).returncode == 0
  out = str(tmp_path / "resumed")
  proc = subprocess.Popen([sys.executable, "-m", "data_prep.build", *common, f"--out_dir={out}"],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not any(
      n.endswith(build.DONE_SUFFIX) for n in (os.listdir(out) if os.path.isdir(out) else [])):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [n for n in os.listdir(out) if n.endswith(build.DONE_SUFFIX)]
  assert 0 < len(done) < 8, "the kill should land mid-run"
  # A shard without its marker is either absent or still a .tmp: never a complete-looking one.
  for name in os.listdir(out):
    if ".tfrecord-" in name and not name.endswith((".tmp", ".index", build.DONE_SUFFIX)):
      assert name + build.DONE_SUFFIX in done or os.path.exists(
          os.path.join(out, name + build.DONE_SUFFIX))
  result = _run_build(common + [f"--out_dir={out}"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert _shard_bytes(out) == _shard_bytes(reference)
  assert dataset_info.load(out) == dataset_info.load(reference)
  assert dataset_info.load(out)["splits"]["train"]["num_examples"] == 24
  # Finished shards are reused only for the same task: other options fail loudly.
  result = _run_build(common + [f"--out_dir={out}", "--jpeg_quality=50"])
  assert result.returncode != 0 and "built from other clips or options" in result.stderr


def test_beam_direct_runner_writes_what_the_local_run_writes(media_dir, tmp_path):
  pytest.importorskip("apache_beam")
  from data_prep import beam_build
  manifest = manifests.load_media_dir(media_dir)
  local, beam = str(tmp_path / "local"), str(tmp_path / "beam")
  shards = {"default": 3}
  info_local = build.build(manifest, local, OPTIONS, shards, num_workers=0)
  info_beam = beam_build.build(manifest, beam, OPTIONS, shards, "DirectRunner")
  assert info_beam == info_local
  assert _shard_bytes(beam) == _shard_bytes(local)
  assert (pathlib.Path(beam, "failures.jsonl").read_text()
          == pathlib.Path(local, "failures.jsonl").read_text())


def test_tfds_reads_the_output(built):
  tfds = pytest.importorskip("tensorflow_datasets")
  out, _ = built
  builder = tfds.builder_from_directory(os.path.join(out, "tfds"))
  assert builder.info.splits["train"].num_examples == 4
  seen = {}
  for ex in tfds.as_numpy(builder.as_dataset(split="train")):
    seen[ex["clip_id"].decode()] = ex
  ours = {}
  info = dataset_info.load(out)
  for path in dataset_info.shard_paths(out, info, "train"):
    for i, data in enumerate(tfrecord.iter_records(path)):
      ex = schema.decode_example(data, path)
      ours[ex["clip_id"]] = ex
  assert sorted(seen) == sorted(ours)
  for clip_id, ex in seen.items():
    mel = np.frombuffer(ex["audio"]["log_mel"], np.float16).reshape(ex["audio"]["shape"])
    np.testing.assert_array_equal(mel, ours[clip_id]["log_mel"])
    # Same JPEG bytes, two decoders: TensorFlow's default (fast integer IDCT) differs from
    # simplejpeg's by a few levels.
    diff = np.abs(ex["video"]["frames"].astype(int) - ours[clip_id]["frames"])
    assert diff.max() <= 4 and diff.mean() < 1.5, (diff.max(), diff.mean())
    np.testing.assert_array_equal(ex["labels"], ours[clip_id]["labels"])


def test_the_trainer_trains_on_the_output(built, tmp_path):
  from avmae import train
  from configs import cav_mae
  out, _ = built
  config = cav_mae.get_config("tiny")
  config.data.dir, config.data.batch_size = out, 8
  config.total_steps, config.log_every_steps = 2, 1
  config.image_every_steps = config.checkpoint_every_steps = 2
  metrics = train.train(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])


def test_inspect_and_verify_tools(built, tmp_path):
  out, _ = built
  copy = shutil.copytree(out, tmp_path / "copy")
  result = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(copy)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train        4 clips in 3 shards" in result.stdout
  assert "failures     5: corrupt 1" in result.stdout or "failures     5: empty 1" in result.stdout
  assert "no_audio" in result.stdout and (copy / "inspect.png").stat().st_size > 10_000
  result = subprocess.run([sys.executable, "-m", "data_prep.verify", str(copy)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "0 problems" in result.stdout, result.stdout
  # Damage one record: verify names it and fails.
  shard = next(p for p in dataset_info.shard_paths(str(copy), dataset_info.load(str(copy)),
                                                   "train") if len(tfrecord.read_index(p)) > 1)
  offsets = tfrecord.read_index(shard)
  with open(shard, "r+b") as f:
    f.seek(int(offsets[0]) + 40)
    f.write(b"\x00\x01\x02\x03")
  result = subprocess.run([sys.executable, "-m", "data_prep.verify", str(copy)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert f"PROBLEM {shard} record 0 at byte offset 0: CRC mismatch" in result.stdout


@pytest.fixture(scope="module")
def audio_only(tmp_path_factory):
  """A dataset built with --require_video=false from six audio-only files: AAC in .m4a, PCM
  in .wav, and an .mp4 whose only picture is cover art (not video)."""
  root = tmp_path_factory.mktemp("audio_media")
  (root / "birds").mkdir()
  (root / "frogs").mkdir()
  for i in range(3):
    media_factory.write_audio(str(root / "birds" / f"b{i}.m4a"), seconds=2.0, codec="aac")
  for i in range(2):
    media_factory.write_audio(str(root / "frogs" / f"f{i}.wav"), seconds=1.5, rate=16000)
  media_factory.write_audio(str(root / "frogs" / "f2.mp4"), seconds=1.5, codec="aac",
                            cover_art=True)
  out = str(tmp_path_factory.mktemp("audio_only"))
  result = _run_build([f"--media_dir={root}", f"--out_dir={out}", "--require_video=false",
                       "--num_shards=2", "--mel_bins=64", "--num_frames=4", "--frame_size=32",
                       "--tfds=false"])
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def _records_in_order(data_dir, split="train"):
  info = dataset_info.load(data_dir)
  return [schema.decode_example(r, path) for path in dataset_info.shard_paths(data_dir, info, split)
          for r in tfrecord.iter_records(path)]


def test_audio_only_dataset_info(audio_only):
  info = dataset_info.load(audio_only)
  assert info["features"]["frames_per_clip"] == 0
  assert info["splits"]["train"]["num_examples"] == 6
  assert info["splits"]["train"]["num_without_video"] == 6
  assert info["failures"]["total"] == 0
  assert [ex["frames"].shape for ex in _records_in_order(audio_only)] == [(0, 32, 32, 3)] * 6


def test_audio_only_dataset_reads_without_frames(audio_only):
  cfg = data.get_config(audio_only)
  cfg.num_frames, cfg.audio_frames = 0, 128
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # the 8 CPU devices
  with pipeline.Batches(cfg, "train", train=True, seed=0, global_batch_size=8,
                        mesh=mesh) as b:
    batch = next(b)
  assert sorted(batch) == ["audio", "labels", "record_index", "valid"]
  assert batch["audio"].shape == (8, 128, 64) and batch["audio"].dtype == np.float32
  assert batch["audio"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert np.asarray(batch["valid"]).all()
  # Evaluation: the six records in order, then two padding rows.
  with pipeline.Batches(cfg, "train", train=False, seed=0, global_batch_size=8,
                        mesh=mesh) as b:
    (batch,) = list(b)
  batch = jax.tree.map(np.asarray, batch)
  stats = dataset_info.load(audio_only)["log_mel_stats"]
  records = _records_in_order(audio_only)
  for row, ex in enumerate(records):
    expected = (augment.crop_or_pad(ex["log_mel"], 128).astype(np.float32) - stats["mean"]
                ) / stats["std"]
    np.testing.assert_allclose(batch["audio"][row], expected, rtol=1e-5, atol=1e-5)
    assert np.flatnonzero(batch["labels"][row]).tolist() == ex["labels"].tolist()
  np.testing.assert_array_equal(batch["valid"], [True] * 6 + [False] * 2)
  np.testing.assert_array_equal(batch["record_index"], [0, 1, 2, 3, 4, 5, -1, -1])
  assert not batch["audio"][6:].any()


def test_a_config_that_needs_frames_fails_on_an_audio_only_dataset(audio_only):
  cfg = data.get_config(audio_only)
  for setting, text in (({"num_frames": 1}, "data.num_frames=1"),
                        ({"all_frames": True}, "data.all_frames=True")):
    cfg.update(setting)
    with pytest.raises(errors.SchemaError,
                       match=rf"^{re.escape(audio_only)}: the dataset has no video .*--require_"
                       rf"video=false; 0 frames per clip, feature video/frames is empty\) but "
                       rf"{re.escape(text)} needs frames"):
      pipeline.Batches(cfg, "train", train=True, seed=0, global_batch_size=8)


def test_inspect_and_verify_an_audio_only_dataset(audio_only, tmp_path):
  png = tmp_path / "inspect.png"
  result = subprocess.run([sys.executable, "-m", "data_prep.inspect", audio_only,
                           f"--png={png}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train        6 clips in 2 shards" in result.stdout
  assert "video        none: audio only (0 frames per clip" in result.stdout
  assert png.stat().st_size > 10_000
  result = subprocess.run([sys.executable, "-m", "data_prep.verify", audio_only], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "0 problems" in result.stdout, result.stdout
  # A dataset_info.json that miscounts the clips without video is a problem.
  copy = shutil.copytree(audio_only, tmp_path / "copy")
  path = copy / dataset_info.FILENAME
  info = json.loads(path.read_text())
  info["splits"]["train"]["num_without_video"] = 5
  path.write_text(json.dumps(info))
  assert verify.verify(str(copy), log=lambda _: None) == [
      "split train: 6 records without video (no frames), dataset_info.json says 5"]


def test_a_dataset_with_some_clips_without_video(media_dir, tmp_path):
  """--require_video=false over videos and one audio-only file: that clip is counted, verify
  passes, frames are refused early and audio only reads."""
  options = dataclasses.replace(OPTIONS, require_video=False)
  info = build.build(manifests.load_media_dir(media_dir), str(tmp_path), options,
                     {"default": 2})
  assert info["splits"]["train"]["num_examples"] == 5
  assert info["splits"]["train"]["num_without_video"] == 1  # birds/e_audio
  assert info["features"]["frames_per_clip"] == 4
  assert inspect_tool.video_summary(info) == ("4 jpeg frames of 32x32 per clip; clips without "
                                              "video: train 1")
  assert verify.verify(str(tmp_path), log=lambda _: None) == []
  cfg = data.get_config(str(tmp_path))
  with pytest.raises(errors.SchemaError, match=r"1 of 5 clips of split 'train' have no video "
                     r"\(feature video/frames is empty"):
    pipeline.Batches(cfg, "train", train=True, seed=0, global_batch_size=5)
  cfg.num_frames = 0
  batch = pipeline.first_examples(cfg, "train", 5)
  assert sorted(batch) == ["audio", "labels", "record_index", "valid"] and batch["valid"].all()
