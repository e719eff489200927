"""Every shipped config builds; the README's main job runs and draws its picture."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  cfg = importlib.import_module(f"configs.{name}").get_config("")
  assert isinstance(cfg, ml_collections.ConfigDict)
  cfg.lock()  # unknown keys now fail, as --config.key=value overrides do


def test_demo_runs(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "avmae.demo", f"--workdir={tmp_path}",
                        "--steps=20"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train        512 clips in 4 shards" in out.stdout
  assert "one epoch: 512 examples" in out.stdout
  assert ("examples per class: {0: 64, 1: 64, 2: 64, 3: 64, 4: 64, 5: 64, 6: 64, 7: 64}"
          in out.stdout)
  assert "[4/5] pretraining the tiny CAV-MAE for 20 steps" in out.stdout
  assert "[5/5] linear probes of every saved step vs a randomly initialised encoder" in out.stdout
  for row in ("audio top1", "video top1", "audio_video top1", "retrieval_a2v r1"):
    assert f"  {row} " in out.stdout, row
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["final"]["loss"] < summary["first"]["loss"]
  assert set(summary["probe"]) == {"pretrained", "random_init"}
  for name in ("clips.png", "loss_curves.png", "reconstructions.png", "probe_curve.png"):
    assert (tmp_path / name).stat().st_size > 10_000, name
  picture = tmp_path / "clips.png"
  assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000
