"""One learning-signal experiment: synthetic data of a seed, pretrain a config, probe every
saved step and a random init of the same shape; prints one line per step (top-1 per mode,
retrieval R@1 both ways and R@10 audio->video).

    python experiments/learning_signal/run.py --name NAME --data_seed 1 [--method av_mae] \
        --size demo [--data num_train=512] [--set loss.temperature=0.1] [--probe layer=weighted]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import time

from absl import logging

from avmae import probe, train
from configs import cav_mae
from configs import probe as probe_config
from data_prep import make_synthetic


def _parse(assignments: list[str]) -> dict:
  """["loss.temperature=0.1", ...] -> {"loss.temperature": 0.1, ...} (Python literals)."""
  out = {}
  for a in assignments:
    key, value = a.split("=", 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--name", required=True)
  ap.add_argument("--root", default="/tmp/learning_signal")
  ap.add_argument("--method", default="cav_mae", help="the config module configs/METHOD.py")
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--data_seed", type=int, default=0)
  ap.add_argument("--data", action="append", default=[], help="make_synthetic key=value")
  ap.add_argument("--set", action="append", default=[], help="train config key=value")
  ap.add_argument("--probe", action="append", default=[], help="probe config key=value")
  ap.add_argument("--steps", default="all")
  args = ap.parse_args()
  logging.set_verbosity(logging.WARNING)
  kwargs = _parse(args.data)
  tag = "_".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
  data_dir = os.path.join(args.root, f"data_s{args.data_seed}{'_' + tag if tag else ''}")
  if not os.path.exists(os.path.join(data_dir, "dataset_info.json")):
    make_synthetic.make_synthetic(data_dir, seed=args.data_seed, **kwargs)
  config = importlib.import_module(f"configs.{args.method}").get_config(args.size)
  config.data.dir = data_dir
  cav_mae.override(config, _parse(args.set))
  workdir = os.path.join(args.root, "runs", args.name)
  start = time.perf_counter()
  train.train(config, workdir)
  train_s = time.perf_counter() - start
  out = {}
  pc = probe_config.get_config(workdir)  # every saved step and a random init beside them
  pc.data.dir, pc.steps = data_dir, args.steps
  cav_mae.override(pc, _parse(args.probe))
  for r in probe.run(pc, os.path.join(workdir, "probe")):
    if r["selected"] and r["split"] == "test" and r["metric"] in ("top1", "r1", "r10"):
      out.setdefault(str(r["step"]), {})[f"{r['mode']}/{r['metric']}"] = r["value"]
  probe_s = time.perf_counter() - start - train_s
  rnd = out.pop("random_init")
  keys = ["audio/top1", "video/top1", "audio_video/top1", "retrieval_a2v/r1",
          "retrieval_v2a/r1", "retrieval_a2v/r10"]
  short = ["a", "v", "av", "a2v@1", "v2a@1", "a2v@10"]
  print(f"RESULT {args.name} seed={args.data_seed} train {train_s:.0f}s probe {probe_s:.0f}s")
  print("RESULT " + f"{'step':>8} " + " ".join(f"{s:>7}" for s in short))
  for step, vals in list(out.items()) + [("random", rnd)]:
    print("RESULT " + f"{step:>8} " + " ".join(f"{vals.get(k, float('nan')):7.3f}" for k in keys))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"args": vars(args), "results": out, "random": rnd, "train_s": train_s}, f)


if __name__ == "__main__":
  main()
