"""Pictures people look at instead of numbers: clips, reconstructions, curves, sweeps."""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on training hosts
import matplotlib.pyplot as plt
import numpy as np

from avmae import storage


def plot_clips(clips: Sequence[dict[str, Any]], path: str, frame_shift_s: float = 0.01) -> None:
  """One row per clip: log-mel spectrogram (frame times marked) and then every frame (none
  for clips without video).

  Each clip is a decoded record (`schema.decode_example`) plus a "title".
  """
  num_frames = max(len(c["frames"]) for c in clips)
  fig, axes = plt.subplots(len(clips), 1 + num_frames, squeeze=False,
                           figsize=(3.2 + 1.3 * num_frames, 1.5 * len(clips)),
                           gridspec_kw={"width_ratios": [3] + [1] * num_frames})
  for row, clip in zip(axes, clips):
    mel = np.asarray(clip["log_mel"], np.float32)
    seconds = mel.shape[0] * frame_shift_s
    row[0].imshow(mel.T, origin="lower", aspect="auto", cmap="magma",
                  extent=(0, seconds, 0, mel.shape[1]))
    for t in clip["timestamps"]:
      row[0].axvline(t, color="cyan", lw=0.8, ls="--")
    row[0].set_title(clip["title"], fontsize=7, loc="left")
    row[0].set_ylabel("mel bin", fontsize=7)
    row[0].tick_params(labelsize=6)
    for ax, frame, t in zip(row[1:], clip["frames"], clip["timestamps"]):
      ax.imshow(frame)
      ax.set_title(f"t={t:.2f}s", fontsize=7)
    for ax in row[1:]:
      ax.axis("off")
  axes[-1][0].set_xlabel("seconds" + (" (dashed: frame times)" if num_frames else ""),
                        fontsize=7)
  _save(fig, path, dpi=110)


def _frame_for_display(frame: np.ndarray, kind: str) -> np.ndarray:
  from avmae.data.augment import IMAGE_MEAN, IMAGE_STD
  rgb = frame * IMAGE_STD + IMAGE_MEAN if kind == "image" else (frame + 1) / 2
  return np.clip(rgb, 0, 1)


# (column title, "spectrogram" [B, T, F], or [B, H, W, 3] "image" normalised with the
# ImageNet statistics or "image_pm1" scaled to [-1, 1], the arrays, a mask of the same shape
# shown shaded where > 0, or None)
Panel = tuple[str, str, Any, Any]


def audio_panels(images: dict[str, Any]) -> list[Panel]:
  """The spectrogram as input, masked input and reconstruction, from arrays under "audio",
  "audio_masked", "audio_reconstruction" and "audio_mask"."""
  return [("input", "spectrogram", images["audio"], None),
          ("masked", "spectrogram", images["audio_masked"], images["audio_mask"]),
          ("reconstruction", "spectrogram", images["audio_reconstruction"], None)]


def audio_video_panels(images: dict[str, Any], image_kind: str = "image", max_times: int = 3
                       ) -> list[Panel]:
  """The panels of an audio-visual reconstruction: spectrogram and frame, each as input,
  masked input and reconstruction, from arrays under "audio", "audio_masked",
  "audio_reconstruction", "audio_mask" and the same of "frames". A clip [B, T, H, W, 3]
  shows up to `max_times` evenly spaced frames of each."""
  panels = audio_panels(images)
  frames = images["frames"]
  if frames.ndim == 4:
    take, times = (lambda x, t: x), [None]
  else:
    take = lambda x, t: x[:, t]
    times = sorted(set(np.linspace(0, frames.shape[1] - 1, max_times).round().astype(int)))
  for heading, key, mask_key in (("frame", "frames", None),
                                 ("masked", "frames_masked", "frames_mask"),
                                 ("reconstruction", "frames_reconstruction", None)):
    for t in times:
      mask = None if mask_key is None else take(images[mask_key], t)
      label = heading if t is None else f"{heading} t{t}"
      panels.append((label, image_kind, take(images[key], t), mask))
  return panels


def plot_reconstructions(panels: Sequence[Panel], path: str, title: str = "",
                         max_rows: int = 4) -> None:
  """Rows of examples, one column a panel (a method's inputs, masked inputs and
  reconstructions). Spectrograms share the colour limits of the first one."""
  rows = min(max_rows, len(panels[0][2]))
  spectrograms = [p[2] for p in panels if p[1] == "spectrogram"]
  lo, hi = np.percentile(spectrograms[0][:rows], [1, 99]) if spectrograms else (0, 1)
  widths = [2.2 if kind == "spectrogram" else 1 for _, kind, _, _ in panels]
  fig, axes = plt.subplots(rows, len(panels), squeeze=False,
                           figsize=(1.3 * sum(widths) + 0.6, 1.9 * rows),
                           gridspec_kw={"width_ratios": widths})
  for r in range(rows):
    for c, (label, kind, x, mask) in enumerate(panels):
      ax = axes[r][c]
      x = np.asarray(x[r], np.float32)
      if kind == "spectrogram":
        x = x if mask is None else np.where(mask[r] > 0, np.nan, x)
        ax.imshow(x.T, origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi)
      else:
        x = _frame_for_display(x, kind)
        ax.imshow(x if mask is None else np.where(mask[r] > 0, 0.5, x))
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(label, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  _save(fig, path, dpi=90)


def plot_loss_curves(records: Sequence[dict[str, float]], keys: Sequence[str], path: str) -> None:
  """Loss terms against step, from metrics.jsonl records."""
  fig, axes = plt.subplots(1, len(keys), squeeze=False, figsize=(3.6 * len(keys), 2.8))
  steps = [r["step"] for r in records]
  for ax, key in zip(axes[0], keys):
    ax.plot(steps, [r[key] for r in records], lw=1.2)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  _save(fig, path)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Validation metric vs learning rate, one panel per mode (lines: weight decay x step)."""
  rows = [r for r in rows if r["split"] == "val" and r["lr"] is not None
          and r["metric"] in ("top1", "map")]
  modes = sorted({r["mode"] for r in rows})
  if not modes:
    return
  fig, axes = plt.subplots(1, len(modes), squeeze=False, figsize=(3.8 * len(modes), 3.0))
  for ax, mode in zip(axes[0], modes):
    mine = [r for r in rows if r["mode"] == mode]
    metric = "top1" if any(r["metric"] == "top1" for r in mine) else "map"
    curves: dict[tuple, list] = {}
    for r in mine:
      if r["metric"] == metric:
        curves.setdefault((r["step"], r["weight_decay"], r["dataset"]), []).append(
            (r["lr"], r["value"]))
    for (step, wd, dataset), points in sorted(curves.items(), key=str):
      points.sort()
      ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, lw=1.2,
              label=f"step {step}, wd {wd:g}" + (f", {os.path.basename(dataset)}"
                                                   if len(curves) > 4 else ""))
    ax.set_xscale("log")
    _finish_axes(ax, f"{mode}: val {metric}", "learning rate")
  _save(fig, path)


def plot_probe_curve(rows: Sequence[dict[str, Any]], path: str) -> dict[str, tuple]:
  """Selected test metric against the training step, one line per mode (top-1, or mAP for
  multi-label data; retrieval R@1 in a second panel), and each mode's random-init result
  as a dashed line of the same colour. Returns the plotted series {label: (steps, values)}."""
  test = [r for r in rows if r["selected"] and r["split"] == "test"]
  if len({r["dataset"] for r in test}) > 1:  # one line per mode and dataset
    test = [{**r, "mode": f"{r['mode']} {os.path.basename(r['dataset'])}"} for r in test]
  classification = "top1" if any(r["metric"] == "top1" for r in test) else "map"
  panels = [(classification, lambda m: not m.startswith("retrieval")),
            ("r1", lambda m: m.startswith("retrieval"))]
  panels = [(metric, keep) for metric, keep in panels
            if any(r["metric"] == metric and keep(r["mode"]) for r in test)]
  series: dict[str, tuple] = {}
  if not panels:
    return series
  fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(4.6 * len(panels), 3.2))
  for ax, (metric, keep) in zip(axes[0], panels):
    mine = [r for r in test if r["metric"] == metric and keep(r["mode"])]
    for k, mode in enumerate(dict.fromkeys(r["mode"] for r in mine)):
      colour = f"C{k}"
      points = sorted((r["step"], r["value"]) for r in mine
                      if r["mode"] == mode and r["step"] != "random_init")
      random = [r["value"] for r in mine if r["mode"] == mode and r["step"] == "random_init"]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", ms=3, lw=1.4, color=colour, label=mode)
        series[mode] = (list(steps), list(values))
      if random:
        ax.axhline(random[0], color=colour, ls="--", lw=1.0, label=f"{mode}, random init")
        series[f"{mode} random_init"] = ([], [random[0]])
    if metric == "r1" and mine:
      chance = 1 / max(r["value"] for r in rows if r["metric"] == "num_queries")
      ax.axhline(chance, color="grey", ls=":", lw=1.0, label="chance")
    _finish_axes(ax, f"test {metric} vs pretraining step", "training step")
  _save(fig, path)
  return series


def _finish_axes(ax, title: str, xlabel: str) -> None:
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)


def _save(fig, path: str, dpi: int = 100) -> None:
  """A PNG at `path`, local or on a bucket."""
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  plt.close(fig)
  storage.write(path, buffer.getvalue())
