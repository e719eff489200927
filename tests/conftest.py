"""Tests run on CPU with 8 simulated devices; datasets are made here, nothing downloads."""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is imported by interop tests
# libtpu is installed (compile-only TPU targets, avmae.aot): the tests and their subprocesses
# run on the CPU, and several processes may load libtpu for AOT compiles at once.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

try:
  # triton (imported by torch._dynamo, which timm's torchvision imports in the export tests)
  # segfaults when it is imported after TensorFlow; imported first, both work.
  importlib.import_module("triton")
except ImportError:
  pass

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
# Identical programs compiled by several tests (and their subprocesses) compile once.
_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "avmae-test-jax-cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import numpy as np
import pytest

from avmae.data import writer

FEATURES = dict(sample_rate=16000, mel_bins=16, log_mel="kaldi", frames_per_clip=3,
                frame_size=[24, 24], video_encoding="jpeg")
NUM_CLASSES = 5


def make_clip(i: int, frames: int = 20) -> dict:
  """Deterministic random clip number i (content depends on i only)."""
  rng = np.random.default_rng(1000 + i)
  return dict(clip_id=f"clip-{i:05d}", source=f"test/{i}.mp4",
              labels=sorted({int(i % NUM_CLASSES), int((i * 7) % NUM_CLASSES)}),
              log_mel=rng.normal(-4.0, 3.0, (frames, FEATURES["mel_bins"])),
              frames=rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8),
              timestamps=np.array([0.1, 0.5, 0.9], np.float32))


def write_dataset(out_dir, num_train: int = 37, num_eval: int = 11, num_shards: int = 3,
                  **features) -> str:
  w = writer.DatasetWriter(str(out_dir), name="test", features={**FEATURES, **features},
                           label_names=[f"class{c}" for c in range(NUM_CLASSES)])
  with w.split("train", num_shards) as split:
    for i in range(num_train):
      split.add(**make_clip(i))
  with w.split("eval", 1) as split:
    for i in range(num_train, num_train + num_eval):
      split.add(**make_clip(i))
  w.finish()
  return str(out_dir)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: a long end-to-end check whose property a quicker test also covers, or "
      "the demo's full learning run; the README's test command leaves these out, "
      "`python -m pytest -q tests` runs them too")


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> str:
  """A small dataset of 37 train clips in 3 shards and 11 eval clips. Do not modify it."""
  return write_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[str, str]:
  """(synthetic dataset, tiny training workdir with checkpoints at steps 2 and 4), for the
  tests that read a trained run (probe, export). Do not modify either."""
  from avmae import train
  from configs import cav_mae
  from data_prep import make_synthetic
  data = str(tmp_path_factory.mktemp("tiny_data"))
  make_synthetic.make_synthetic(data, num_train=48, num_eval=16, num_shards=2)
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  c = cav_mae.get_config("tiny")
  c.data.dir, c.data.batch_size = data, 16
  c.total_steps, c.checkpoint_every_steps, c.log_every_steps, c.image_every_steps = 4, 2, 2, 4
  train.train(c, workdir)
  return data, workdir
