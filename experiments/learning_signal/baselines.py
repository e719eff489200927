"""Baselines that need no pretraining, for a dataset directory: what the data itself allows.

    python experiments/learning_signal/baselines.py DATA [DATA ...]

- raw pixels: logistic regression on the middle frame's pixels (train -> eval split);
- handcrafted video: logistic regression on the 2-D FFT magnitude of the middle frame's
  foreground mask (distance from the border colour): translation-invariant shape;
- handcrafted audio: logistic regression on the mean and std over time of each mel bin;
- supervised ViT: the video encoder of `--size` (tiny; mean-pooled, linear head) trained end
  to end on the labels from one random frame, `--supervised_steps` steps of batch 32: can the
  architecture learn the visual classes at all in a demo's budget?
Prints one row per dataset.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from avmae.data import dataset_info, pipeline, schema
from avmae.data.augment import normalize_image
from avmae.data.source import TFRecordSource
from avmae.methods import METHODS
from configs import cav_mae


def _records(data_dir: str, split: str):
  info = dataset_info.load(data_dir)
  source = TFRecordSource(dataset_info.shard_paths(data_dir, info, split), False)
  for i in range(len(source)):
    _, data, where = source[i]
    ex = schema.decode_example(data, where, lambda n: np.array([n // 2]))
    yield ex["frames"][0], ex["log_mel"], int(ex["labels"][0])


def _foreground_fft(frame: np.ndarray) -> np.ndarray:
  img = frame.astype(np.float32) / 255
  border = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
  mask = np.linalg.norm(img - border, axis=-1)
  return np.abs(np.fft.fft2(mask)).reshape(-1)


def _features(data_dir: str, split: str) -> dict[str, np.ndarray]:
  raw, fft, audio, labels = [], [], [], []
  for frame, log_mel, label in _records(data_dir, split):
    raw.append(frame.reshape(-1).astype(np.float32) / 255)
    fft.append(_foreground_fft(frame))
    mel = log_mel.astype(np.float32)
    audio.append(np.concatenate([mel.mean(0), mel.std(0)]))
    labels.append(label)
  return {"raw_pixels": np.stack(raw), "handcrafted_video": np.stack(fft),
          "handcrafted_audio": np.stack(audio), "labels": np.array(labels)}


def _logistic(train, test, key) -> float:
  clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
  clf.fit(train[key], train["labels"])
  return float((clf.predict(test[key]) == test["labels"]).mean())


def supervised_vit(data_dir: str, steps: int, seed: int = 0, size: str = "tiny") -> float:
  """Eval top-1 of the video encoder of `size` + linear head trained end to end on the labels."""
  config = cav_mae.get_config(size)
  config.data.dir = data_dir
  method = METHODS[config.method](config)
  num_classes = len(dataset_info.load(data_dir)["label_names"])
  batches = pipeline.Batches(config.data, "train", train=True, seed=seed, global_batch_size=32)
  first = {k: jnp.asarray(v) for k, v in next(batches).items()}
  params = {"encoder": nn.meta.unbox(method.init(jax.random.key(seed), first))["params"],
            "w": jnp.zeros((config.model.embed_dim, num_classes)), "b": jnp.zeros(num_classes)}
  opt = optax.adamw(1e-3, weight_decay=0.05)
  state = opt.init(params)

  def logits(p, batch):
    f = method.model.apply({"params": p["encoder"]}, batch["audio"],
                           normalize_image(batch["frames"]), method="features")["video"]
    return f @ p["w"] + p["b"]

  @jax.jit
  def step(p, s, batch):
    g = jax.grad(lambda p: optax.softmax_cross_entropy(logits(p, batch), batch["labels"]).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state, {k: jnp.asarray(v) for k, v in next(batches).items()})
  batches.close()
  count = dataset_info.load(data_dir)["splits"]["eval"]["num_examples"]
  test = {k: jnp.asarray(v) for k, v in pipeline.first_examples(config.data, "eval", count).items()}
  pred = np.asarray(jax.jit(logits)(params, test)).argmax(1)
  return float((pred == np.asarray(test["labels"]).argmax(1))[np.asarray(test["valid"])].mean())


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("data", nargs="+")
  ap.add_argument("--supervised_steps", type=int, default=1000)
  ap.add_argument("--size", default="tiny", help="configs/cav_mae.py size of the supervised ViT")
  args = ap.parse_args()
  print(f"{'dataset':<48} {'raw px':>7} {'fft(fg)':>8} {'audio hc':>9} {'sup. ViT':>9}")
  for data_dir in args.data:
    train, test = _features(data_dir, "train"), _features(data_dir, "eval")
    scores = [_logistic(train, test, k)
              for k in ("raw_pixels", "handcrafted_video", "handcrafted_audio")]
    sup = (supervised_vit(data_dir, args.supervised_steps, size=args.size)
           if args.supervised_steps else np.nan)
    print(f"{data_dir:<48} {scores[0]:>7.3f} {scores[1]:>8.3f} {scores[2]:>9.3f} {sup:>9.3f}",
          flush=True)


if __name__ == "__main__":
  main()
