"""Every registered method, driven through train, probe and export by the same code: nothing
here names a method's batch keys, model fields or formats."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from avmae import extract, probe, sharding, train
from avmae.export import files, to_torch
from avmae.methods import METHODS
from configs import probe as probe_config
from data_prep import make_synthetic

# (method, config size): every CPU size of every method's config module; a method's sizes
# after its first (the same code at another shape) run with the slow tests.
CASES = [pytest.param(name, size, marks=pytest.mark.slow if i else ())
         for name in sorted(METHODS)
         for i, size in enumerate(importlib.import_module(f"configs.{name}").CPU_SIZES)]


@pytest.mark.parametrize("name,size", CASES)
def test_every_method_trains_probes_and_exports(name, size, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config(size)
  data = str(tmp_path / "data")
  # The dataset at the config's geometry.
  make_synthetic.make_synthetic(data, num_train=32, num_eval=16, num_shards=1,
                                frames_per_clip=max(config.data.num_frames, 4),
                                frame_size=config.data.image_size,
                                mel_bins=config.model.mel_bins)
  config.data.dir, config.data.batch_size = data, 8
  config.total_steps = config.checkpoint_every_steps = config.image_every_steps = 2
  config.log_every_steps = 1
  workdir = str(tmp_path / "train")
  metrics = train.train(config, workdir)
  assert np.isfinite(metrics["loss"])
  assert os.path.exists(os.path.join(workdir, "reconstruction_0000002.png"))

  probe_cfg = probe_config.get_config(workdir)
  probe_cfg.data.dir, probe_cfg.data.batch_size, probe_cfg.cache = data, 16, False
  probe_cfg.random_baseline = False
  probe_cfg.sweep.lrs, probe_cfg.sweep.weight_decays, probe_cfg.sweep.steps = (0.1,), (0.0,), 20
  rows = probe.run(probe_cfg, str(tmp_path / "probe"))
  method = METHODS[name](config)
  modes = {r["mode"] for r in rows}
  assert all(np.isfinite(r["value"]) for r in rows if r["metric"] != "num_queries_with_ties")

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  _, params = extract.load_params(extract.training_config(workdir), mesh, workdir, 2, 0)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  feature_modes = {k for k in jax.eval_shape(method.features, params, method.example_batch(2))
                   if not k.endswith("_layers")}
  assert feature_modes | {f"retrieval_{d}" for d in method.retrieval} == modes
  for fmt in method.export_formats:
    paths = to_torch.export(workdir, str(tmp_path / f"{fmt}.safetensors"), fmt)
    exported = [files.load(p) for p in paths]
    for path in paths:
      with open(path + ".json") as f:
        meta = json.load(f)
      assert meta["format"] == fmt and meta["source"]["step"] == 2
    assert all(np.isfinite(v).all() for sd in exported for v in sd.values())
    if fmt == method.export_formats[0]:  # the default format holds every parameter
      assert sum(v.size for sd in exported for v in sd.values()) >= num_params
  with pytest.raises(ValueError, match=r"--format 'onnx': the .* model of .* exports as one of"):
    to_torch.export(workdir, str(tmp_path / "x.safetensors"), "onnx")
