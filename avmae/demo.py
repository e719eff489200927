"""The main job on the built-in dataset: `python -m avmae.demo --workdir DIR`.

Makes the synthetic audio-visual dataset, reads it back through the input pipeline onto a
device mesh (summary and a picture of a few clips: spectrogram beside frames), pretrains the
tiny CAV-MAE on it, writes a summary (loss curves, reconstructions, final metrics), and
linear-probes every saved step against a randomly initialised encoder of the same shape
(probe_curve.png).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import time

from absl import app, flags, logging
import jax
import numpy as np

from avmae import plots, probe, sharding, train
from avmae.data import pipeline
from configs import cav_mae
from configs import probe as probe_config
from data_prep import inspect, make_synthetic

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the dataset and pictures go.",
                               required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic dataset and of the shuffle.")
_STEPS = flags.DEFINE_integer("steps", 0, "Pretraining steps (0: configs/cav_mae.py:demo's).")
_STEPS_TOTAL = 5
CURVES = ("loss", "loss_mae_a", "loss_mae_v", "loss_contrastive", "contrastive_accuracy")


def _step(number: int, text: str) -> float:
  print(f"[{number}/{_STEPS_TOTAL}] {text}", flush=True)
  return time.perf_counter()


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # the demo prints its own progress; orbax is chatty
  workdir = _WORKDIR.value
  data_dir = os.path.join(workdir, "data")
  os.makedirs(workdir, exist_ok=True)

  # = python -m avmae.train --config=configs/cav_mae.py:demo
  config = cav_mae.get_config("demo")
  start = _step(1, f"making the synthetic dataset in {data_dir}")
  # At the demo model's geometry (64 px frames, 64 mel bins).
  info = make_synthetic.make_synthetic(data_dir, seed=_SEED.value,
                                       frame_size=config.model.image_size,
                                       mel_bins=config.model.mel_bins)
  print(f"  done in {time.perf_counter() - start:.1f} s")
  inspect.summarize(data_dir, info)

  start = _step(2, f"reading it back through the pipeline on {jax.device_count()} device(s)")
  config.data.dir = data_dir
  cfg = config.data
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  labels, examples = collections.Counter(), 0
  batch_size = cfg.batch_size - cfg.batch_size % jax.device_count()
  with pipeline.Batches(cfg, "train", train=True, seed=_SEED.value,
                        global_batch_size=batch_size, mesh=mesh) as batches:
    num_batches = -(-info["splits"]["train"]["num_examples"] // batch_size)  # one epoch
    for i in range(num_batches):
      batch = next(batches)
      if i == 0:
        for key, value in batch.items():
          print(f"  batch[{key!r}] {value.dtype}{list(value.shape)} sharded {value.sharding.spec}")
      labels.update(np.argmax(np.asarray(batch["labels"]), axis=1).tolist())
      examples += batch_size
  seconds = time.perf_counter() - start
  print(f"  one epoch: {examples} examples in {seconds:.1f} s ({examples / seconds:.0f}/s); "
        f"examples per class: {dict(sorted(labels.items()))}; corrupt records skipped: "
        f"{batches.num_skipped}")

  _step(3, "drawing a few clips")
  picture = os.path.join(workdir, "clips.png")
  plots.plot_clips(inspect.read_clips(data_dir, info, "train", 4), picture)
  print(f"  saved {picture}")

  config.total_steps = _STEPS.value or config.total_steps
  config.seed = _SEED.value
  start = _step(4, f"pretraining the tiny CAV-MAE (configs/cav_mae.py:demo) for "
                   f"{config.total_steps} steps")
  train_dir = os.path.join(workdir, "train")
  final = train.train(config, train_dir)
  records = [json.loads(line) for line in open(os.path.join(train_dir, "metrics.jsonl"))]
  curves = os.path.join(workdir, "loss_curves.png")
  plots.plot_loss_curves(records, CURVES, curves)
  reconstructions = sorted(glob.glob(os.path.join(train_dir, "reconstruction_*.png")))
  shutil.copy(reconstructions[-1], os.path.join(workdir, "reconstructions.png"))
  summary = {"steps": config.total_steps, "seconds": time.perf_counter() - start,
             "first": records[0], "final": final}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"  {config.total_steps} steps in {summary['seconds']:.0f} s")
  for key in CURVES:
    print(f"  {key:<22} step {records[0]['step']:>4}: {records[0][key]:.4f}   "
          f"step {records[-1]['step']:>4}: {records[-1][key]:.4f}")
  print(f"  saved {curves}, {os.path.join(workdir, 'reconstructions.png')}, "
        f"{os.path.join(workdir, 'summary.json')}")

  _step(5, "linear probes of every saved step vs a randomly initialised encoder")
  config = probe_config.get_config(train_dir)
  config.data.dir, config.steps = data_dir, "all"  # random_baseline: a random init beside
  probe_dir = os.path.join(workdir, "probe")
  rows = probe.run(config, probe_dir)
  selected = [r for r in rows if r["selected"] and r["split"] == "test"]
  final_step = max(r["step"] for r in selected if r["step"] != "random_init")
  results = {name: {(r["mode"], r["metric"]): r["value"] for r in selected if r["step"] == step}
             for name, step in (("pretrained", final_step), ("random_init", "random_init"))}
  print(f"  {'test metric (step ' + str(final_step) + ')':<34} {'pretrained':>11} "
        f"{'random init':>12} {'difference':>11}")
  for key in sorted(results["pretrained"]):
    if key[1] in ("top1", "r1", "r10"):
      a, b = results["pretrained"][key], results["random_init"][key]
      print(f"  {key[0] + ' ' + key[1]:<34} {a:>11.4f} {b:>12.4f} {a - b:>+11.4f}")
  shutil.copy(os.path.join(probe_dir, "curve.png"), os.path.join(workdir, "probe_curve.png"))
  print(f"  saved {os.path.join(workdir, 'probe_curve.png')} (test metrics vs step, random "
        "init dashed)")
  summary["probe"] = {name: {f"{m}/{k}": v for (m, k), v in r.items()}
                      for name, r in results.items()}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


if __name__ == "__main__":
  app.run(main)
