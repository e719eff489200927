"""configs/cav_mae.py:base_official and :scale_pp_official hold the official CAV-MAE pretraining
runs value for value, against tables transcribed from the official code (YuanGongND/cav-mae;
each entry cites file:line), and the preprocessing they name acts as the official one does."""

import os
import pathlib
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from avmae import checkpoint, optim, sharding
from avmae.data import augment, dataset_info, pipeline
from avmae.export import cav_mae_layout
from avmae.methods import METHODS
from avmae.methods import cav_mae as cav_mae_method
from configs import cav_mae
from data_prep import build, make_synthetic, media, media_factory

REPO = pathlib.Path(__file__).resolve().parents[1]

# The run scripts, transcribed (name: value  # file:line).
SCRIPTS = {
    "base_official": {  # egs/audioset/run_cavmae_pretrain_base.sh
        "gpus": 4,  # run_cavmae_pretrain_base.sh:4  #SBATCH --gres=gpu:4 (DataParallel)
        "masking_ratio": 0.75,  # run_cavmae_pretrain_base.sh:19
        "mask_mode": "unstructured",  # run_cavmae_pretrain_base.sh:20
        "contrast_loss_weight": 0.01,  # run_cavmae_pretrain_base.sh:21
        "mae_loss_weight": 1.0,  # run_cavmae_pretrain_base.sh:22
        "norm_pix_loss": True,  # run_cavmae_pretrain_base.sh:24
        "lr": 5e-5,  # run_cavmae_pretrain_base.sh:31
        "epoch": 25,  # run_cavmae_pretrain_base.sh:32
        "lrscheduler_start": 10,  # run_cavmae_pretrain_base.sh:33
        "lrscheduler_decay": 0.5,  # run_cavmae_pretrain_base.sh:34
        "lrscheduler_step": 5,  # run_cavmae_pretrain_base.sh:35
        "dataset_mean": -5.081,  # run_cavmae_pretrain_base.sh:36
        "dataset_std": 4.4849,  # run_cavmae_pretrain_base.sh:37
        "target_length": 1024,  # run_cavmae_pretrain_base.sh:38
        "noise": True,  # run_cavmae_pretrain_base.sh:39
        "batch_size": 48,  # run_cavmae_pretrain_base.sh:41
    },
    "scale_pp_official": {  # egs/audioset/run_cavmae_pretrain_scale++.sh
        "gpus": 4,  # run_cavmae_pretrain_scale++.sh:5  #SBATCH --gres=gpu:4
        "masking_ratio": 0.75,  # run_cavmae_pretrain_scale++.sh:20
        "mask_mode": "unstructured",  # run_cavmae_pretrain_scale++.sh:21
        "contrast_loss_weight": 0.01,  # run_cavmae_pretrain_scale++.sh:22
        "mae_loss_weight": 1.0,  # run_cavmae_pretrain_scale++.sh:23
        "norm_pix_loss": True,  # run_cavmae_pretrain_scale++.sh:25
        "lr": 2e-4,  # run_cavmae_pretrain_scale++.sh:33
        "epoch": 25,  # run_cavmae_pretrain_scale++.sh:34
        "lrscheduler_start": 10,  # run_cavmae_pretrain_scale++.sh:35
        "lrscheduler_decay": 0.5,  # run_cavmae_pretrain_scale++.sh:36
        "lrscheduler_step": 5,  # run_cavmae_pretrain_scale++.sh:37
        "dataset_mean": -5.081,  # run_cavmae_pretrain_scale++.sh:38
        "dataset_std": 4.4849,  # run_cavmae_pretrain_scale++.sh:39
        "target_length": 1024,  # run_cavmae_pretrain_scale++.sh:40
        "noise": True,  # run_cavmae_pretrain_scale++.sh:41
        "batch_size": 256,  # run_cavmae_pretrain_scale++.sh:43
    },
}
# What the official Python code fixes for both runs.
CODE = {
    "im_res": 224,  # src/run_cavmae_pretrain.py:73
    "num_mel_bins": 128,  # src/run_cavmae_pretrain.py:74
    "freqm": 0, "timem": 0,  # src/run_cavmae_pretrain.py:74 (no SpecAugment in pretraining)
    "modality_specific_depth": 11,  # src/run_cavmae_pretrain.py:109
    "weight_decay": 5e-7,  # src/traintest_cavmae.py:50 torch.optim.Adam(..., weight_decay=5e-7
    "betas": (0.95, 0.999),  # src/traintest_cavmae.py:50 betas=(0.95, 0.999))
    "eps": 1e-8,  # src/traintest_cavmae.py:50 passes none: torch.optim.Adam's default
    "no_decay_groups": (),  # src/traintest_cavmae.py:47 one group of every trainable parameter
    "grad_clip": 0.0,  # src/traintest_cavmae.py:96-99 zero_grad, backward, step: no clipping
    "warmup_steps": 0,  # src/run_cavmae_pretrain.py:51 parses --warmup; traintest_cavmae.py
                        # never reads args.warmup
    "temperature": 0.05,  # src/models/cav_mae.py:359 / 0.05
    "bidirectional": False,  # src/models/cav_mae.py:411 forward_contrastive's default (:353)
    "noise_max_scale": 0.1,  # src/dataloader.py:292 torch.rand(...) * np.random.rand() / 10
    "image_mean": (0.485, 0.456, 0.406),  # src/dataloader.py:129
    "image_std": (0.229, 0.224, 0.225),  # src/dataloader.py:130
    "frames": 1,  # src/dataloader.py:218 one random frame of 10 in training
    "train_clips": 1_772_023,  # egs/audioset/training_logs/as2m_pretrain_base.txt:70
}
# "Epoch-N lr: X", printed after scheduler.step() at the end of epoch N (src/
# traintest_cavmae.py:168-170): the lr of epoch N + 1. egs/audioset/training_logs/
# as2m_pretrain_base.txt:496 (Epoch-1) to :9788 (Epoch-25); every epoch between has the lr of
# the last one listed.
BASE_LOG_LR = {1: 5e-05,  # as2m_pretrain_base.txt:496
               9: 5e-05,  # as2m_pretrain_base.txt:3593
               10: 2.5e-05,  # as2m_pretrain_base.txt:3980
               14: 2.5e-05,  # as2m_pretrain_base.txt:5529
               15: 1.25e-05,  # as2m_pretrain_base.txt:5916
               20: 6.25e-06,  # as2m_pretrain_base.txt:7852
               25: 3.125e-06}  # as2m_pretrain_base.txt:9788

OFFICIAL = sorted(SCRIPTS)


def expected(name: str) -> dict:
  """The config values the official run implies (the docstring of configs/cav_mae.py says
  why each maps so)."""
  s, gpus = SCRIPTS[name], SCRIPTS[name]["gpus"]
  steps_per_epoch = -(-CODE["train_clips"] // s["batch_size"])  # avmae pads the last batch
  return {
      "total_steps": s["epoch"] * steps_per_epoch,
      "data.batch_size": s["batch_size"],
      "data.audio_frames": s["target_length"], "model.audio_frames": s["target_length"],
      "model.mel_bins": CODE["num_mel_bins"],
      "data.image_size": CODE["im_res"], "model.image_size": CODE["im_res"],
      "data.num_frames": CODE["frames"], "model.num_frames": CODE["frames"],
      "model.modality_specific_depth": CODE["modality_specific_depth"],
      "model.shared_depth": 12 - CODE["modality_specific_depth"],
      "data.log_mel_norm": "audioset_cav_mae",
      "data.augment.noise": CODE["noise_max_scale"] if s["noise"] else 0.0,
      "data.augment.time_roll": s["noise"],  # src/dataloader.py:291-293: the roll with the noise
      "data.augment.roll_gain": False,
      "data.augment.freq_mask": CODE["freqm"], "data.augment.time_mask": CODE["timem"],
      "data.augment.random_resized_crop": False, "data.augment.flip": False,
      "masking.ratio_a": s["masking_ratio"], "masking.ratio_v": s["masking_ratio"],
      "masking.mode_a": s["mask_mode"], "masking.mode_v": "unstructured",
      "loss.mae_weight": s["mae_loss_weight"],
      "loss.contrastive_weight": s["contrast_loss_weight"],
      "loss.norm_pix": s["norm_pix_loss"], "loss.video_target": "patch",
      "loss.temperature": CODE["temperature"], "loss.bidirectional": CODE["bidirectional"],
      "loss.group_size": s["batch_size"] // gpus,  # negatives within each GPU's share
      "optimizer.name": "adam",  # coupled L2, as torch.optim.Adam's weight_decay
      "optimizer.learning_rate": s["lr"],
      "optimizer.b1": CODE["betas"][0], "optimizer.b2": CODE["betas"][1],
      # The loss summed over the gpus (src/traintest_cavmae.py:94 loss.sum()) is Adam with
      # decay and eps divided by their count (tests/test_optim.py checks it against torch).
      "optimizer.weight_decay": CODE["weight_decay"] / gpus,
      "optimizer.eps": CODE["eps"] / gpus,
      "optimizer.no_decay": CODE["no_decay_groups"],
      "optimizer.grad_clip_norm": CODE["grad_clip"],
      "optimizer.accumulation_steps": 1,
      "optimizer.warmup_steps": CODE["warmup_steps"],
      # src/traintest_cavmae.py:57 MultiStepLR(range(start, 1000, step), gamma=decay): the
      # milestones inside the run.
      "optimizer.schedule": "step",
      "optimizer.decay_epochs": tuple(range(s["lrscheduler_start"], s["epoch"],
                                            s["lrscheduler_step"])),
      "optimizer.decay_factor": s["lrscheduler_decay"],
  }


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _same(got, want) -> bool:
  if isinstance(want, (str, bool)):
    return type(got) is type(want) and got == want
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return got.shape == want.shape and np.allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", OFFICIAL)
def test_every_value_is_the_official_one(name):
  config = cav_mae.get_config(name)
  config.lock()
  wrong = {key: (_get(config, key), want) for key, want in expected(name).items()
           if not _same(_get(config, key), want)}
  assert not wrong, wrong
  assert tuple(config.optimizer.decay_epochs) == (10, 15, 20)
  # The model is base's, whose parameter count tests/test_train.py checks (190,129,920; the
  # official log's 190.130 million trainable, as2m_pretrain_base.txt:106).
  assert config.model.to_dict() == cav_mae.get_config("base").model.to_dict()


def test_the_fixed_constants_are_the_official_ones():
  stats = {"mean": 0.0, "std": 1.0}  # a dataset's own: the official constants ignore it
  for name in OFFICIAL:
    s = SCRIPTS[name]
    assert dataset_info.LOG_MEL_NORMS["audioset_cav_mae"](stats) == (s["dataset_mean"],
                                                                      s["dataset_std"])
  np.testing.assert_allclose(augment.IMAGE_MEAN, CODE["image_mean"], rtol=1e-7)
  np.testing.assert_allclose(augment.IMAGE_STD, CODE["image_std"], rtol=1e-7)


@pytest.mark.parametrize("name", OFFICIAL)
def test_the_config_passes_the_methods_checks(name):
  """The official batch, groups and geometry hold together (a group divides the batch)."""
  config = cav_mae.get_config(name)
  info = {"features": {"mel_bins": CODE["num_mel_bins"]}}
  failed = [c for c in cav_mae_method.config_checks(config, info, sharding.make_mesh(
      config.mesh)) if not c[0]]
  assert not failed, failed


def test_the_schedule_gives_the_official_logs_lr_at_every_epoch():
  """The lr of every step of epoch N + 1 is the official log's "Epoch-N lr" (decay at the
  first step of epochs 10, 15 and 20 counted from 0)."""
  config = cav_mae.get_config("base_official")
  per_epoch = -(-CODE["train_clips"] // config.data.batch_size)
  schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps, per_epoch)
  log_lr = {0: SCRIPTS["base_official"]["lr"]}
  for epoch in range(1, 26):
    log_lr[epoch] = BASE_LOG_LR.get(epoch, log_lr[epoch - 1])
  for epoch in range(25):  # 0-based: trained at the lr printed after epoch `epoch` (1-based)
    first, last = epoch * per_epoch, (epoch + 1) * per_epoch - 1
    for step in (first, first + 1, last):
      np.testing.assert_allclose(float(schedule(step)), log_lr[epoch], rtol=1e-6,
                                 err_msg=f"epoch {epoch} step {step}")


def test_base_differs_from_the_official_run_only_where_its_docstring_says():
  base = cav_mae.get_config("base")
  official = cav_mae.get_config("base_official")
  diff = {key for key in expected("base_official")
          if key != "total_steps" and not _same(_get(base, key), _get(official, key))}
  assert diff == {"data.log_mel_norm", "loss.group_size", "optimizer.warmup_steps",
                  "optimizer.weight_decay", "optimizer.eps"}
  assert base.init_checkpoint == ""
  assert "--config.init_checkpoint=" in cav_mae.__doc__
  assert "IN-initial.pth" in cav_mae.__doc__


# ----------------------------------------------------------------------------- preprocessing

def _official_audio(normalised: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """src/dataloader.py:291-293 with NumPy's draws in its order: noise (a scale, then the
  [T, F] uniforms), then the roll."""
  scale = rng.random() * CODE["noise_max_scale"]
  noisy = normalised + rng.random(normalised.shape) * scale
  return np.roll(noisy, int(rng.integers(-normalised.shape[0], normalised.shape[0])), axis=0)


def test_audio_gets_noise_then_the_roll_as_the_official_dataloader():
  config = cav_mae.get_config("base_official").data
  config.audio_frames = 64
  info = {"features": {"mel_bins": 16, "frame_size": [24, 24], "frames_per_clip": 3},
          "label_names": ["a"], "log_mel_stats": {"mean": 0.0, "std": 1.0}}
  spec = pipeline.example_spec(config, info, train=True)
  log_mel = np.random.default_rng(0).normal(-5, 4, (80, 16)).astype(np.float32)
  normalised = (log_mel[:64] - SCRIPTS["base_official"]["dataset_mean"]) / (
      SCRIPTS["base_official"]["dataset_std"])
  for seed in range(3):
    got = pipeline._prepare_audio(log_mel, spec, np.random.default_rng(seed))
    np.testing.assert_allclose(got, _official_audio(normalised, np.random.default_rng(seed)),
                               rtol=1e-5, atol=1e-5)
  evaluation = pipeline.example_spec(config, info, train=False)
  np.testing.assert_allclose(pipeline._prepare_audio(log_mel, evaluation,
                                                     np.random.default_rng(0)),
                             normalised, rtol=1e-5, atol=1e-6)


def _torchvision(image: np.ndarray, size: int, mode: T.InterpolationMode) -> np.ndarray:
  """src/dataloader.py:124-126: T.Resize(im_res, BICUBIC), T.CenterCrop(im_res) on the PIL
  image (mode BILINEAR: src/preprocess/extract_video_frame.py:15-17, torchvision's default)."""
  return np.asarray(T.CenterCrop(size)(T.Resize(size, interpolation=mode)(
      Image.fromarray(image))))


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_bicubic_frames_match_the_official_dataloaders_resize(shape):
  """Where torchvision's resized frame has whole-pixel sides (it truncates the long side) the
  two agree to the byte; bicubic and bilinear do differ."""
  image = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
  bicubic = media.resize_and_crop(image, 32, "bicubic")
  np.testing.assert_array_equal(bicubic, _torchvision(image, 32, T.InterpolationMode.BICUBIC))
  bilinear = media.resize_and_crop(image, 32)
  np.testing.assert_array_equal(bilinear, _torchvision(image, 32, T.InterpolationMode.BILINEAR))
  assert np.abs(bicubic.astype(int) - bilinear).mean() > 1


def test_the_dataloaders_bicubic_resize_leaves_extracted_frames_unchanged():
  """extract_video_frame.py saves 224 px frames; the dataloader's resize to 224 is then the
  identity (so data_prep's default bilinear gives the official frames from videos)."""
  frame = np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_torchvision(frame, 224, T.InterpolationMode.BICUBIC), frame)


def test_frame_resize_is_a_build_option(tmp_path):
  options = build.BuildOptions(frame_resize="bicubic", frame_size=16, num_frames=2,
                               require_audio=False)
  assert options.decode_options().frame_resize == "bicubic"
  assert options.features()["frame_resize"] == "bicubic"
  assert build.BuildOptions().features()["frame_resize"] == "bilinear"
  stripes = lambda index, seconds, height, width: np.broadcast_to(  # edges the filters blur
      (np.arange(width) % 4 < 2)[None, :, None] * np.uint8(255), (height, width, 3)).copy()
  video = media_factory.write_video(str(tmp_path / "v.mp4"), seconds=1.2, fps=5,
                                    pattern=stripes)["path"]
  clips = {resize: media.decode_clip(video, None, None, build.BuildOptions(
      frame_resize=resize, frame_size=16, num_frames=2, require_audio=False).decode_options())
      for resize in media.RESIZE_FILTERS}
  assert clips["bicubic"].frames.shape == clips["bilinear"].frames.shape == (2, 16, 16, 3)
  assert not np.array_equal(clips["bicubic"].frames, clips["bilinear"].frames)
  with pytest.raises(ValueError, match="frame_resize must be one of"):
    media.DecodeOptions(frame_resize="nearest")


# ----------------------------------------------------------------------------- initialisation

def _documented_commands() -> list[str]:
  """The commands configs/cav_mae.py's docstring gives to start from IN-initial.pth."""
  lines = cav_mae.__doc__.replace("\\\n", " ").splitlines()
  return [" ".join(l.split()) for l in lines if l.strip().startswith("python -m avmae.")]


def test_the_documented_command_starts_training_from_in_initial(tmp_path):
  """The docstring's command, at the tiny size, from an IN-initial-style file (CAVMAE's keys
  plus the cls tokens): the cls tokens are listed, and the parameters it starts from are the
  file's, exactly."""
  config = cav_mae.get_config("tiny")
  method = METHODS["cav_mae"](config)
  params = sharding.strip_logical_names(method.init(jax.random.key(1),
                                                    method.example_batch(2))["params"])
  sd = cav_mae_layout.to_official(jax.tree.map(np.asarray, params), method.model)
  cls = np.ones((1, 1, config.model.embed_dim), np.float32)
  initial = tmp_path / "IN-initial.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in
               {**sd, "cls_token_a": cls, "cls_token_v": cls, "cls_token_av": cls}.items()},
             initial)
  make_synthetic.make_synthetic(str(tmp_path / "DATA"), num_train=32, num_eval=16,
                                num_shards=1)
  commands = _documented_commands()
  assert [c.split()[2] for c in commands] == ["avmae.train"]
  args = [a.replace("=IN-initial.pth", f"={initial}").replace("=runs/", f"={tmp_path}/runs/")
          .replace("cav_mae.py:base", "cav_mae.py:tiny").replace("=DATA", f"={tmp_path}/DATA")
          for a in shlex.split(commands[0])]
  args += ["--config.total_steps=1", "--config.data.batch_size=16",  # one step, quickly
           "--config.image_every_steps=1000", "--config.checkpoint_every_steps=1"]
  run = subprocess.run([sys.executable, *args[1:]], cwd=str(REPO), capture_output=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "['cls_token_a', 'cls_token_v', 'cls_token_av']" in run.stdout
  assert f"initialised parameters from {initial}" in run.stdout
  # What init_checkpoint loads from the file is the parameters it was made from, bit for bit.
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding
                                                       .SingleDeviceSharding(jax.devices()[0])),
                        params)
  loaded = checkpoint.load_params(str(initial), target, method.model.layer_stacks,
                                  method.import_state_dict)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
