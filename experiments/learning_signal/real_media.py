"""Real-media check: mp4 files made here, through data_prep.build, the demo recipe and the probe.

    python experiments/learning_signal/real_media.py --workdir DIR [--num_train 1536 --seed 0]

Writes h264 + AAC mp4 clips with PyAV (nothing shared with data_prep.make_synthetic): each of 8
classes is a kind of sound (plucked string, bell, drum, whistle, buzzer, chirp, hum, clicks)
with a kind of moving two-colour picture (stripes of an orientation, checkerboard, rings,
dots, a wipe, ...). Pitch, tempo, loudness, noise, the two colours (either one the brighter),
phase, speed and scale vary per clip. Then, as a user would:
`data_prep.build` (defaults except --frame_size and --mel_bins, the demo's geometry: 64 and 64,
--num_frames 4 and --num_shards),
`avmae.train --config=configs/cav_mae.py:demo`, `avmae.probe --config.steps=all` (a random
init of the same shape beside), and a table of pretrained vs random init with the margins.
"""

from __future__ import annotations

import argparse
import csv
import fractions
import json
import os
import subprocess
import sys
import time

import av
import numpy as np

from configs import cav_mae

RATE, FPS, SIZE, SECONDS = 16000, 25, 96, 2.0
SOUNDS = ("pluck", "bell", "drum", "whistle", "buzzer", "chirp", "hum", "clicks")
PICTURES = ("stripes_h", "stripes_v", "stripes_diag", "checker", "rings", "dots", "wipe",
            "spokes")


def sound(kind: str, rng: np.random.Generator) -> np.ndarray:
  t = np.arange(int(RATE * SECONDS)) / RATE
  f0 = np.exp(rng.uniform(np.log(150), np.log(600)))
  if kind == "pluck":  # Karplus-Strong string, re-plucked at a random tempo
    period = int(RATE / f0)
    out, every = np.zeros_like(t), int(RATE * rng.uniform(0.3, 0.6))
    for start in range(int(rng.integers(0, every)), len(t), every):
      buf, n = rng.uniform(-1, 1, period), min(len(t) - start, RATE)
      note = np.empty(n)
      for i in range(n):
        note[i] = buf[i % period]
        buf[i % period] = 0.498 * (buf[i % period] + buf[(i + 1) % period])
      out[start:start + n] += note
  elif kind == "bell":  # inharmonic partials, exponential decays
    onset = rng.uniform(0, 0.5)
    u = np.maximum(t - onset, 0)
    out = sum(a * np.sin(2 * np.pi * f0 * r * u) * np.exp(-u * d)
              for r, a, d in ((1, 1, 2), (2.76, 0.6, 3), (5.4, 0.4, 5), (8.93, 0.25, 8)))
    out = out * (t >= onset)
  elif kind == "drum":  # noise bursts over a falling thump
    out, beat = np.zeros_like(t), rng.uniform(0.2, 0.45)
    for start in np.arange(rng.uniform(0, beat), SECONDS, beat):
      u = np.maximum(t - start, 0) * (t >= start)
      out += (rng.normal(0, 0.5, t.shape) + np.sin(2 * np.pi * 60 * (1 + 2 * np.exp(-u * 30))
                                                   * u)) * np.exp(-u * 18) * (t >= start)
  elif kind == "whistle":  # sine with vibrato, gliding up
    glide = f0 * 2 * (1 + 0.3 * t / SECONDS)
    phase = 2 * np.pi * np.cumsum(glide * (1 + 0.02 * np.sin(2 * np.pi * 6 * t))) / RATE
    out = np.sin(phase)
  elif kind == "buzzer":  # square wave with tremolo
    out = np.sign(np.sin(2 * np.pi * f0 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(3, 8)
                                                                      * t))
  elif kind == "chirp":  # repeated downward sweeps
    period = rng.uniform(0.25, 0.5)
    u = (t + rng.uniform(0, period)) % period / period
    out = np.sin(2 * np.pi * np.cumsum(f0 * 4 * (1 - 0.75 * u)) / RATE) * (1 - u)
  elif kind == "hum":  # low sawtooth, smoothed
    saw = 2 * ((f0 / 3 * t) % 1) - 1
    out = np.convolve(saw, np.ones(8) / 8, mode="same")
  else:  # clicks at a random rate
    out = np.zeros_like(t)
    out[(np.arange(0, SECONDS, 1 / rng.uniform(6, 14)) * RATE).astype(int)] = 1.0
    out = np.convolve(out, np.hanning(40), mode="same")
  out = out / (np.abs(out).max() + 1e-9) * 10 ** (rng.uniform(-18, 0) / 20) * 0.8
  return (out + rng.normal(0, 10 ** (rng.uniform(-50, -30) / 20), t.shape)).astype(np.float32)


def picture(kind: str, rng: np.random.Generator) -> np.ndarray:
  """uint8 [frames, SIZE, SIZE, 3]: a two-colour pattern moving over the clip."""
  n = int(FPS * SECONDS)
  y, x = (np.mgrid[:SIZE, :SIZE] + 0.5) / SIZE - 0.5
  scale, speed, phase = rng.uniform(4, 7), rng.uniform(0.5, 1.5), rng.uniform(0, 1)
  centre = rng.uniform(-0.15, 0.15, 2)
  colours = rng.uniform(0, 1, (2, 3))
  while np.linalg.norm(colours[0] - colours[1]) < 0.5:
    colours = rng.uniform(0, 1, (2, 3))
  frames = []
  for k in range(n):
    s = phase + speed * k / FPS
    r, a = np.hypot(x - centre[0], y - centre[1]), np.arctan2(y - centre[1], x - centre[0])
    field = {
        "stripes_h": y * scale + s, "stripes_v": x * scale + s,
        "stripes_diag": (x + y) * scale / np.sqrt(2) + s,
        "checker": np.floor(x * scale + s) + np.floor(y * scale),
        "rings": r * scale * 1.5 - s, "spokes": a * 4 / np.pi + s,
        "dots": 1.0 * (np.hypot((x * scale + s) % 1 - 0.5, (y * scale) % 1 - 0.5) < 0.3),
        "wipe": 1.0 * (x + 0.5 < (s * 0.5 % 1.0)),
    }[kind]
    mask = (np.floor(field) % 2)[..., None]
    image = colours[0] * (1 - mask) + colours[1] * mask
    frames.append(np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1))
  return (np.stack(frames) * 255).astype(np.uint8)


def write_mp4(path: str, frames: np.ndarray, audio: np.ndarray) -> None:
  with av.open(path, "w") as container:
    video = container.add_stream("h264", rate=FPS)
    video.width = video.height = SIZE
    video.pix_fmt = "yuv420p"
    stream = container.add_stream("aac", rate=RATE, layout="mono")
    for image in frames:
      container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    container.mux(video.encode(None))
    for begin in range(0, len(audio), 1024):
      frame = av.AudioFrame.from_ndarray(audio[None, begin:begin + 1024], format="fltp",
                                         layout="mono")
      frame.sample_rate, frame.pts = RATE, begin
      frame.time_base = fractions.Fraction(1, RATE)
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_media(media_dir: str, num_train: int, num_eval: int, seed: int) -> str:
  """Writes the clips and a plain manifest (path,labels,split); returns the manifest path."""
  os.makedirs(media_dir, exist_ok=True)
  manifest = os.path.join(media_dir, "manifest.csv")
  rows = []
  for split, count in (("train", num_train), ("eval", num_eval)):
    for i in range(count):
      label = i % len(SOUNDS)
      rng = np.random.default_rng([seed, split == "eval", i])
      name = f"{split}_{i:05d}.mp4"
      if not os.path.exists(os.path.join(media_dir, name)):
        write_mp4(os.path.join(media_dir, name), picture(PICTURES[label], rng),
                  sound(SOUNDS[label], rng))
      rows.append({"path": name, "labels": f"{SOUNDS[label]}_{PICTURES[label]}",
                   "split": split})
      if (len(rows)) % 256 == 0:
        print(f"  {len(rows)}/{num_train + num_eval} clips written", flush=True)
  with open(manifest, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["path", "labels", "split"])
    w.writeheader()
    w.writerows(rows)
  return manifest


def _run(args: list[str]) -> None:
  print("$ " + " ".join(args), flush=True)
  subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num_train", type=int, default=1536)
  ap.add_argument("--num_eval", type=int, default=128)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  media, data = os.path.join(args.workdir, "media"), os.path.join(args.workdir, "data")
  train_dir, probe_dir = os.path.join(args.workdir, "train"), os.path.join(args.workdir, "probe")
  times = {}
  start = time.perf_counter()
  manifest = make_media(media, args.num_train, args.num_eval, args.seed)
  times["write mp4"] = time.perf_counter() - start
  demo = cav_mae.get_config("demo").model
  stages = [
      ("data_prep.build", ["data_prep.build", f"--manifest={manifest}", f"--media_root={media}",
                           f"--out_dir={data}", f"--frame_size={demo.image_size}",
                           f"--mel_bins={demo.mel_bins}",
                           "--num_frames=4", "--num_shards=train=4,eval=1", "--tfds=false"]),
      ("pretrain", ["avmae.train", "--config=configs/cav_mae.py:demo", f"--workdir={train_dir}",
                    f"--config.data.dir={data}"]),
      ("probe", ["avmae.probe", f"--config=configs/probe.py:{train_dir}", f"--workdir={probe_dir}",
                 f"--config.data.dir={data}", "--config.steps=all"]),
  ]
  for name, command in stages:
    start = time.perf_counter()
    _run(command)
    times[name] = time.perf_counter() - start
  rows = json.load(open(os.path.join(probe_dir, "results.json")))["rows"]
  selected = [r for r in rows if r["selected"] and r["split"] == "test"]
  last = max(r["step"] for r in selected if r["step"] != "random_init")
  value = lambda step, mode, metric: next(r["value"] for r in selected if r["step"] == step
                                          and r["mode"] == mode and r["metric"] == metric)
  print(f"\nreal media, seed {args.seed}: test metrics at step {last} vs a random init")
  print(f"{'metric':<22} {'pretrained':>10} {'random':>8} {'diff':>7}")
  for mode, metric in (("audio", "top1"), ("video", "top1"), ("audio_video", "top1"),
                       ("retrieval_a2v", "r1"), ("retrieval_v2a", "r1"),
                       ("retrieval_a2v", "r10"), ("retrieval_v2a", "r10")):
    a, b = value(last, mode, metric), value("random_init", mode, metric)
    print(f"{mode + ' ' + metric:<22} {a:>10.3f} {b:>8.3f} {a - b:>+7.3f}")
  print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
  main()
