"""data_prep.build end to end on real media made with PyAV: counts, failures, record contents,
resume after a kill, Beam DirectRunner = local run, tfds interop, and training on the result."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from avmae.data import dataset_info, features, schema, tfrecord
from data_prep import build, manifests, media, verify
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
