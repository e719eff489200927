"""Frozen-feature evaluation: `python -m avmae.probe --config=configs/probe.py:WORKDIR
--workdir=PROBE_DIR`.

For every checkpoint step x dataset: restore the encoder (onto this mesh), extract features of
the train/val/test splits once (cached), train linear heads for every mode over the whole
learning-rate x weight-decay grid at once (vmapped), pick the best point on validation, report
it on test, and measure audio<->video retrieval with the contrastive embeddings. Writes
results.json, results.csv, sweep.png, curve.png (metric vs training step per mode, a random
init of the same shape as a dashed line) and prints a table.
"""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

from absl import app, flags
import ml_collections
import numpy as np
from ml_collections import config_flags

from avmae import extract, metrics, plots, probe_heads, sharding, storage
from avmae.data import dataset_info

RESULT_KEYS = ("step", "dataset", "mode", "metric", "value", "lr", "weight_decay", "split",
               "selected", "dataset_hash")


def _steps(config: ml_collections.ConfigDict) -> list[int | None]:
  """The checkpoint steps to probe (None: a random initialisation)."""
  if config.random_init:
    return [None]
  saved = extract.saved_steps(config.checkpoint_dir)
  baseline = [None] if config.random_baseline else []
  if not config.steps:
    return [saved[-1]] + baseline
  if config.steps == "all":
    return saved + baseline
  wanted = [int(s) for s in str(config.steps).split(",")]
  missing = sorted(set(wanted) - set(saved))
  if missing:
    raise ValueError(f"config.steps: no checkpoints {missing} in {config.checkpoint_dir}; "
                     f"saved: {saved}")
  return wanted + baseline


def _data_config(config: ml_collections.ConfigDict, train_config, data_dir: str):
  """The probe's data settings, with the input geometry and normalisation the encoder was
  trained with (the training config's data section)."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.dir = data_dir
  trained = train_config.data
  data.audio_frames, data.image_size = trained.audio_frames, trained.image_size
  # Workdirs from before clips and the normalisation choice existed: one frame, the
  # dataset's own statistics.
  data.num_frames = trained.get("num_frames", 1)
  data.frame_stride = trained.get("frame_stride", 1)
  data.log_mel_norm = trained.get("log_mel_norm", "dataset")
  mel_bins = dataset_info.load(data_dir)["features"]["mel_bins"]
  if mel_bins != train_config.model.mel_bins:
    raise ValueError(f"config.data.dir={data_dir} has {mel_bins} mel bins, but the encoder of "
                     f"{config.checkpoint_dir} was trained on {train_config.model.mel_bins}")
  return data


def probe_modes(config: ml_collections.ConfigDict, feats: dict[str, np.ndarray]) -> list[str]:
  """config.modes, or with () every mode the method's features have (CAV-MAE: audio, video,
  audio_video; Audio-MAE: audio)."""
  available = sorted(k for k in feats if not k.endswith("_layers") and k not in
                     ("labels", "record_index"))
  unknown = [m for m in config.modes if m not in available]
  if unknown:
    raise ValueError(f"config.modes={tuple(config.modes)}: the encoder has no {unknown} "
                     f"features; it has {available}")
  return list(config.modes) or available


def _select_layer(feats: dict[str, np.ndarray], mode: str, layer: str) -> np.ndarray:
  if layer == "final":
    return feats[mode]
  layers = feats[f"{mode}_layers"]
  if layer == "weighted":
    return layers
  index = int(layer)
  if not -layers.shape[1] <= index < layers.shape[1]:
    raise ValueError(f"config.layer={layer}: the encoder has layers 0..{layers.shape[1] - 1}")
  return layers[:, index]


def _split_train_val(train: dict[str, np.ndarray], fraction: float, seed: int):
  """A deterministic hold-out of `fraction` of the train records for model selection."""
  order = np.random.default_rng(seed).permutation(len(train["record_index"]))
  cut = max(1, int(round(len(order) * fraction)))
  pick = lambda idx: {k: v[np.sort(idx)] for k, v in train.items()}
  return pick(order[cut:]), pick(order[:cut])


def classification_metrics(scores: np.ndarray, targets: np.ndarray, multilabel: bool
                           ) -> dict[str, float]:
  """mAP always; top-1/top-5 for single-label; mean AUC and d-prime for multi-label."""
  out = {"map": metrics.mean_average_precision(scores, targets)["map"]}
  if multilabel:
    out.update(metrics.mean_auc_dprime(scores, targets))
  else:
    labels = targets.argmax(1)
    out["top1"] = metrics.top_k_accuracy(scores, labels, 1)
    out["top5"] = metrics.top_k_accuracy(scores, labels, min(5, scores.shape[1]))
  return out


def probe_mode(config, train_x, train_y, val_x, val_y, test_x, test_y, multilabel: bool
               ) -> list[dict[str, Any]]:
  """Trains the whole grid at once; one row per grid point and metric, best point marked."""
  sweep = config.sweep
  params = probe_heads.train_sweep(train_x, train_y, head=config.head, multilabel=multilabel,
                                   lrs=list(sweep.lrs), weight_decays=list(sweep.weight_decays),
                                   steps=sweep.steps, batch_size=sweep.batch_size,
                                   seed=config.seed)
  grid = [(lr, wd) for lr in sweep.lrs for wd in sweep.weight_decays]  # lr major
  val_scores = np.asarray(probe_heads.predict(params, val_x, config.head))
  test_scores = np.asarray(probe_heads.predict(params, test_x, config.head))
  selection = "map" if multilabel else "top1"
  val = [classification_metrics(s, val_y, multilabel) for s in val_scores]
  best = probe_heads.select_best(np.array([m[selection] for m in val]))
  rows = []
  for g, (lr, wd) in enumerate(grid):
    for split, values in (("val", val[g]), ("test", classification_metrics(
        test_scores[g], test_y, multilabel))):
      rows += [{"metric": k, "value": float(v), "lr": lr, "weight_decay": wd, "split": split,
                "selected": g == best} for k, v in values.items()]
  return rows


def retrieval_rows(test: dict[str, np.ndarray], directions: dict[str, tuple[str, str]]
                   ) -> list[dict[str, Any]]:
  """Retrieval in each direction: {name: (query mode, gallery mode)} over the test features."""
  return [{"mode": f"retrieval_{name}", "metric": k, "value": float(v), "lr": None,
           "weight_decay": None, "split": "test", "selected": True}
          for name, (query, gallery) in directions.items()
          for k, v in metrics.retrieval(test[query], test[gallery]).items()]


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Probes every step x dataset; writes results.json/.csv and sweep.png; returns the rows."""
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  train_config = extract.training_config(config.checkpoint_dir)
  mesh = sharding.make_mesh(config.mesh)
  cache = str(storage.path(workdir) / "features") if config.cache else None
  spec = json.dumps({"layer": "all", "all_frames": config.data.all_frames,
                     "dtype": train_config.dtype})
  rows: list[dict[str, Any]] = []
  for step in _steps(config):
    method, params = extract.load_params(train_config, mesh, config.checkpoint_dir, step,
                                         config.seed)
    label = "random_init" if step is None else step
    for data_dir in str(config.data.dir).split(","):
      data = _data_config(config, train_config, data_dir)
      start = time.perf_counter()
      get = lambda split: extract.extract(method, params, data, split, mesh, cache, spec)
      train, test = get(config.splits.train), get(config.splits.test)
      if config.splits.val:
        val = get(config.splits.val)
      else:
        train, val = _split_train_val(train, config.splits.val_fraction, config.seed)
      print(f"[probe] step {label} {data_dir}: features of {len(train['labels'])} train, "
            f"{len(val['labels'])} val, {len(test['labels'])} test clips in "
            f"{time.perf_counter() - start:.1f} s", flush=True)
      multilabel = bool((train["labels"].sum(1) > 1).any() or (test["labels"].sum(1) > 1).any())
      base = {"step": label, "dataset": data_dir, "dataset_hash": extract.dataset_hash(data_dir)}
      for mode in probe_modes(config, train):
        xs = [_select_layer(d, mode, config.layer) for d in (train, val, test)]
        mode_rows = probe_mode(config, xs[0], train["labels"], xs[1], val["labels"], xs[2],
                               test["labels"], multilabel)
        rows += [{**base, "mode": mode, **r} for r in mode_rows]
      if config.retrieval:
        rows += [{**base, **r} for r in retrieval_rows(test, method.retrieval)]
  write_results(workdir, config, rows)
  return rows


def write_results(workdir: str, config: ml_collections.ConfigDict,
                  rows: list[dict[str, Any]]) -> None:
  out = storage.path(workdir)
  storage.write(out / "results.json", json.dumps(
      {"config": json.loads(config.to_json_best_effort()), "rows": rows}, indent=1))
  table = io.StringIO(newline="")
  w = csv.DictWriter(table, fieldnames=RESULT_KEYS)
  w.writeheader()
  w.writerows(rows)
  storage.write(out / "results.csv", table.getvalue())
  plots.plot_sweep(rows, str(out / "sweep.png"))
  plots.plot_probe_curve(rows, str(out / "curve.png"))
  print(summary_table(rows))


def summary_table(rows: list[dict[str, Any]]) -> str:
  """Selected test results: one line per step x dataset x mode."""
  lines = [f"{'step':>11}  {'mode':<16} {'metric':<12} {'value':>8}  {'lr':>8} {'wd':>8}  dataset"]
  for r in rows:
    if r["selected"] and r["split"] == "test":
      lr = "" if r["lr"] is None else f"{r['lr']:.0e}"
      wd = "" if r["weight_decay"] is None else f"{r['weight_decay']:.0e}"
      lines.append(f"{str(r['step']):>11}  {r['mode']:<16} {r['metric']:<12} "
                   f"{r['value']:>8.4f}  {lr:>8} {wd:>8}  {r['dataset']}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  run(f.config, f.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Probe config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where results and the feature cache go.",
                      required=True)
  app.run(main)
