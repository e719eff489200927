"""The probe: features equal on 1 and 8 devices, the cache key, results files, clear errors."""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest

from avmae import extract, plots, probe, sharding
from avmae.data import augment, pipeline
from configs import probe as probe_config
from data_prep import make_synthetic


def _probe_config(data, workdir, **overrides):
  c = probe_config.get_config(workdir)
  c.data.dir, c.data.batch_size = data, 16
  c.sweep.steps, c.sweep.lrs, c.sweep.weight_decays = 20, (1e-2, 1e-1), (0.0, 1e-3)
  c.update(overrides)
  return c


def test_features_are_the_same_on_1_and_8_devices(tiny_run, tmp_path):
  data, workdir = tiny_run
  config = extract.training_config(workdir)
  probe_data = probe._data_config(_probe_config(data, workdir), config, data)
  out = {}
  for devices in (1, 8):
    mesh = sharding.make_mesh({"data": devices, "fsdp": 1, "tensor": 1})
    method, params = extract.load_params(config, mesh, workdir, 4, seed=0)
    out[devices] = extract.extract(method, params, probe_data, "eval", mesh, None, "spec")
  assert out[1]["audio"].shape == (16, 64)
  for key in out[1]:
    np.testing.assert_allclose(out[8][key], out[1][key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(np.sort(out[1]["record_index"]), np.arange(16))


def test_cache_is_reused_and_invalidated_by_a_new_checkpoint(tiny_run, tmp_path):
  data, workdir = tiny_run
  config = extract.training_config(workdir)
  probe_data = probe._data_config(_probe_config(data, workdir), config, data)
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  cache = str(tmp_path / "cache")
  method, params2 = extract.load_params(config, mesh, workdir, 2, seed=0)
  first = extract.extract(method, params2, probe_data, "eval", mesh, cache, "spec")
  (path,) = os.listdir(cache)
  np.savez(os.path.join(cache, path), **{**first, "audio": first["audio"] * 0 + 7})
  reused = extract.extract(method, params2, probe_data, "eval", mesh, cache, "spec")
  assert np.all(reused["audio"] == 7), "the cached file should have been read"
  _, params4 = extract.load_params(config, mesh, workdir, 4, seed=0)
  fresh = extract.extract(method, params4, probe_data, "eval", mesh, cache, "spec")
  assert len(os.listdir(cache)) == 2 and not np.all(fresh["audio"] == 7)
  extract.extract(method, params4, probe_data, "eval", mesh, cache, "other spec")
  assert len(os.listdir(cache)) == 3


def test_probe_writes_results_for_every_step(tiny_run, tmp_path):
  data, workdir = tiny_run
  rows = probe.run(_probe_config(data, workdir, steps="all"), str(tmp_path))
  assert {r["step"] for r in rows} == {2, 4, "random_init"}
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["rows"] == json.loads(json.dumps(rows))
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == list(probe.RESULT_KEYS) and len(table) == len(rows)
  for step in (2, 4):
    for mode in ("audio", "video", "audio_video"):
      mine = [r for r in rows if r["step"] == step and r["mode"] == mode]
      assert len({(r["lr"], r["weight_decay"]) for r in mine}) == 4
      chosen = {(r["lr"], r["weight_decay"]) for r in mine if r["selected"]}
      assert len(chosen) == 1
      val = {(r["lr"], r["weight_decay"]): r["value"] for r in mine
             if r["split"] == "val" and r["metric"] == "top1"}
      assert val[chosen.pop()] == max(val.values())
    assert any(r["mode"] == "retrieval_a2v" and r["metric"] == "r1" for r in rows)
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
  assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_probe_curve_has_a_line_per_mode_and_the_random_init(tiny_run, tmp_path):
  data, workdir = tiny_run
  rows = probe.run(_probe_config(data, workdir, steps="all"), str(tmp_path))
  series = plots.plot_probe_curve(rows, str(tmp_path / "curve_again.png"))
  modes = ("audio", "video", "audio_video", "retrieval_a2v", "retrieval_v2a")
  assert set(series) == {*modes, *(f"{m} random_init" for m in modes)}
  for mode in modes:
    steps, values = series[mode]
    assert steps == [2, 4]
    metric = "r1" if mode.startswith("retrieval") else "top1"
    expected = [r["value"] for step in (2, 4) for r in rows if r["step"] == step
                and r["mode"] == mode and r["metric"] == metric and r["selected"]
                and r["split"] == "test"]
    assert values == expected
    (baseline,) = [r["value"] for r in rows if r["step"] == "random_init" and r["mode"] == mode
                   and r["metric"] == metric and r["selected"] and r["split"] == "test"]
    assert series[f"{mode} random_init"][1] == [baseline]
  assert (tmp_path / "curve_again.png").stat().st_size > 10_000


def test_mismatched_checkpoint_or_dataset_fails_clearly(tiny_run, tmp_path):
  data, workdir = tiny_run
  other_data = str(tmp_path / "data128")
  make_synthetic.make_synthetic(other_data, num_train=8, num_eval=8, mel_bins=128,
                                num_shards=1)
  with pytest.raises(ValueError, match=r"has 128 mel bins, but the encoder .* trained on 64"):
    probe.run(_probe_config(other_data, workdir), str(tmp_path / "a"))
  changed = str(tmp_path / "changed")
  shutil.copytree(workdir, changed)
  config = json.load(open(os.path.join(changed, "config.json")))
  config["model"]["embed_dim"] = 128
  json.dump(config, open(os.path.join(changed, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"does not fit the model of .*config.json"):
    probe.run(_probe_config(data, changed), str(tmp_path / "b"))
  with pytest.raises(ValueError, match=r"config.steps: no checkpoints \[3\]"):
    probe.run(_probe_config(data, workdir, steps="3"), str(tmp_path / "c"))


def test_weighted_layers_and_all_frames(tiny_run, tmp_path):
  data, workdir = tiny_run
  config = _probe_config(data, workdir, layer="weighted", modes=("audio", "video"),
                         retrieval=False)
  config.data.all_frames = True
  rows = probe.run(config, str(tmp_path))
  assert {r["mode"] for r in rows} == {"audio", "video"}
  assert all(np.isfinite(r["value"]) for r in rows)
  # With all frames, a clip's features are the mean of its per-frame features.
  train_config = extract.training_config(workdir)
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  method, params = extract.load_params(train_config, mesh, workdir, 4, seed=0)
  data_cfg = probe._data_config(config, train_config, data)
  feats = extract.extract(method, params, data_cfg, "eval", mesh, None, "all")
  assert feats["video_layers"].shape == (16, 4, 64)  # embeddings, 2 blocks, final
  batch = pipeline.first_examples(data_cfg, "eval", 16)  # frames [16, 4, 32, 32, 3]
  params = jax.device_get(params)
  per_frame = [method.model.apply({"params": params}, batch["audio"],
                           augment.normalize_image(batch["frames"][:, n]), method="features")
               for n in range(batch["frames"].shape[1])]
  order = np.argsort(feats["record_index"])
  for key in ("audio", "video", "audio_video"):
    expected = np.mean([np.asarray(f[key]) for f in per_frame], axis=0)
    np.testing.assert_allclose(feats[key][order], expected, rtol=1e-4, atol=1e-5, err_msg=key)
