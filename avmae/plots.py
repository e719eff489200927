"""Pictures people look at instead of numbers: clips (spectrogram beside frames)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on training hosts
import matplotlib.pyplot as plt
import numpy as np


def plot_clips(clips: Sequence[dict[str, Any]], path: str, frame_shift_s: float = 0.01) -> None:
  """One row per clip: log-mel spectrogram (frame times marked) and then every frame.

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
  axes[-1][0].set_xlabel("seconds (dashed: frame times)", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
