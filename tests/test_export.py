"""Export to PyTorch and import back: layouts, files, the PyTorch module, timm, the CLIs."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from avmae import extract, masking, sharding, train
from avmae.data import augment, features
from avmae.export import cav_mae_layout, files, to_torch, torch_cav_mae, torch_frontend
from avmae.import_torch import import_checkpoint
from avmae.methods import METHODS
from configs import cav_mae

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "golden" / "cav_mae_state_dict.txt"  # the official listing


def _listing(model_name: str) -> list[tuple[str, tuple[int, ...]]]:
  """(key, shape) rows of one official model in the reference listing, in state_dict order."""
  sections, rows = {}, None
  for line in FIXTURE.read_text().splitlines():
    header = re.match(r"# (CAVMAE\w*)\(", line)  # "# CAVMAEFT(label_dim=527, ..."
    if header:
      rows = sections.setdefault(header.group(1), [])
    elif rows is not None and line and not line.startswith("#"):
      key, shape, _ = line.split("\t")
      rows.append((key, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())))
  return sections[model_name]


def _random_params(size: str, seed: int = 1):
  """The model and float32 NumPy parameters, every leaf perturbed (no zero biases or unit
  norms that could hide a transposition)."""
  config = cav_mae.get_config(size)
  config.data.batch_size, config.dtype = 1, "float32"
  method = METHODS[config.method](config)
  params = jax.jit(lambda: method.init(jax.random.key(0), method.example_batch(1))["params"])()
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: (np.asarray(x) + 0.02 * rng.standard_normal(x.shape)
                                   ).astype(np.float32), sharding.strip_logical_names(params))
  return config, method.model, params


def _torch_model(config, sd, **kwargs):
  model = torch_cav_mae.CAVMAE(**cav_mae_layout.torch_args(config.model), **kwargs)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  return model.eval()


def _rel(ref, got) -> float:
  ref = np.asarray(ref, np.float64)
  return float(np.abs(ref - np.asarray(got, np.float64)).max() / np.abs(ref).max())


@pytest.mark.parametrize("size", ["tiny", pytest.param("base", marks=pytest.mark.slow),
                                  "tiny_video"])
def test_pytorch_module_matches_jax(size):
  config, model, params = _random_params(size)
  tm = _torch_model(config, cav_mae_layout.to_official(params, model))
  m, batch = config.model, 2
  rng = np.random.default_rng(0)
  audio = rng.standard_normal((batch, m.audio_frames, m.mel_bins)).astype(np.float32)
  frames = rng.standard_normal((batch, *model.frames_shape)).astype(np.float32)
  t_audio = torch.from_numpy(audio)  # frames [B, (T,) H, W, 3] -> [B, 3, (T,) H, W]
  t_frames = torch.from_numpy(frames).permute(0, frames.ndim - 1, *range(1, frames.ndim - 1))
  states = jax.jit(lambda p, a, f: model.apply({"params": p}, a, f, method="hidden_states"))(
      params, audio, frames)
  mask_a = masking.random_mask(masking.example_keys(jax.random.key(3), batch),
                               model.num_audio_tokens, 0.75)
  mask_v = masking.random_mask(masking.example_keys(jax.random.key(4), batch),
                               model.num_video_tokens, 0.75)
  out = jax.jit(lambda p, a, f, ma, mv: model.apply({"params": p}, a, f, ma, mv))(
      params, audio, frames, mask_a, mask_v)
  ids = [torch.from_numpy(np.asarray(x, np.int64)) for x in
         (mask_a.ids_keep, mask_a.ids_restore, mask_v.ids_keep, mask_v.ids_restore)]
  with torch.no_grad():
    t_states = tm.hidden_states(t_audio, t_frames)
    t_out = tm(t_audio, t_frames, *ids)
  errors = {}
  for mode, key in (("audio", "audio_feats"), ("video", "video_feats"),
                    ("audio_video", "fusion_feats")):
    assert len(t_states[key]) == len(states[mode]) == m.modality_specific_depth + 2
    for layer, (x, y) in enumerate(zip(states[mode], t_states[key])):
      assert y.shape == x.shape
      errors[f"{key}[{layer}]"] = _rel(x, y.numpy())
  for key in ("latent", "latent_a", "latent_v", "pred_a", "pred_v"):
    errors[key] = _rel(out[key], t_out[key].numpy())
  for name, latent in (("embedding_a", "latent_a"), ("embedding_v", "latent_v")):
    pooled = np.asarray(out[latent]).mean(1)
    errors[name] = _rel(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
                        t_out[name].numpy())
  print(f"{size}: max relative error per output:",
        {k: f"{v:.1e}" for k, v in errors.items() if "[" not in k},
        f"hidden states {max(v for k, v in errors.items() if '[' in k):.1e}")
  assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("bidirectional", [False, True])
def test_pytorch_pretraining_loss_and_gradients_match_jax(bidirectional):
  """The torch peer of the speed benchmark trains on the same objective: at the same weights
  and masks its loss terms and every parameter's gradient equal the JAX loss_fn's."""
  config, model, params = _random_params("tiny")
  config.loss.bidirectional = bidirectional
  method, batch_size, m = METHODS[config.method](config), 4, config.model
  rng = np.random.default_rng(2)
  batch = {"audio": rng.standard_normal((batch_size, m.audio_frames, m.mel_bins)
                                        ).astype(np.float32),
           "frames": rng.integers(0, 256, (batch_size, m.image_size, m.image_size, 3),
                                  dtype=np.uint8),
           "valid": np.ones((batch_size,), bool)}
  keys = masking.example_keys(jax.random.key(5), batch_size)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(method.loss_fn, has_aux=True))(
      params, batch, keys)
  tm = _torch_model(config, cav_mae_layout.to_official(params, model)).train()
  masks = [torch.from_numpy(np.array(x, np.int64 if x.dtype == np.int32 else np.float32))
           for mask in method.masks(keys) for x in (mask.ids_keep, mask.ids_restore, mask.mask)]
  frames = torch.from_numpy(np.asarray(augment.normalize_image(batch["frames"]))).permute(0, 3, 1, 2)
  c = config.loss
  t_loss, t_metrics = torch_cav_mae.pretraining_loss(
      tm, torch.from_numpy(batch["audio"]), frames, masks, c.mae_weight, c.contrastive_weight,
      c.temperature, c.bidirectional, c.norm_pix)
  t_loss.backward()
  np.testing.assert_allclose(t_loss.item(), float(loss), rtol=1e-5)
  for ours, theirs in (("loss_mae_a", "loss_mae_a"), ("loss_mae_v", "loss_mae_v"),
                       ("contrastive_accuracy", "contrastive_accuracy")):
    np.testing.assert_allclose(t_metrics[theirs].item(), float(metrics[ours]), rtol=1e-5)
  np.testing.assert_allclose(t_metrics["nce"].item() * c.contrastive_weight,
                             float(metrics["loss_contrastive"]), rtol=1e-5)
  ref = cav_mae_layout.to_official(jax.tree.map(np.asarray, grads), model)
  compared = 0
  for name, p in tm.named_parameters():
    if p.requires_grad and p.grad is None:  # unused by this forward (e.g. norm1_a of blocks_a)
      assert not np.any(ref[name]), name
    elif p.requires_grad:
      assert _rel(ref[name], p.grad.numpy()) < 1e-4, name
      compared += 1
  assert compared > 50


def test_official_layouts_of_every_variant_and_the_pytorch_module():
  base = cav_mae.get_config("base")
  base.data.batch_size = 1
  method = METHODS[base.method](base)
  abstract = sharding.strip_logical_names(jax.eval_shape(
      lambda: method.init(jax.random.key(0), method.example_batch(1))["params"]))
  rng = np.random.default_rng(0)
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  values = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), abstract)
  official = cav_mae_layout.to_official(values, method.model)
  back = cav_mae_layout.from_official({"module." + k: v for k, v in official.items()},
                                      method.model)
  jax.tree.map(np.testing.assert_array_equal, back, values)  # base round trip, bit-exact
  del official, back, values
  head = cav_mae_layout.init_head(768, 527)
  for variant, name, kwargs in (
      ("pretrain", "CAVMAE", {}),
      ("finetune", "CAVMAEFT", dict(decoder=False, num_classes=527)),
      ("finetune_audio", "CAVMAEFTAudio", dict(decoder=False, video=False, num_classes=527))):
    sd = cav_mae_layout.to_official(zeros, method.model, variant,
                                    None if variant == "pretrain" else head)
    official = _listing(name)
    assert len(official) == {"pretrain": 647, "finetune": 478, "finetune_audio": 252}[variant]
    assert [(k, v.shape) for k, v in sd.items()] == official, variant
    # The PyTorch module has exactly that state_dict. (Not built on the meta device: that
    # imports torch._dynamo and triton, which crashes in a process that loaded TensorFlow.)
    tm = torch_cav_mae.CAVMAE(**cav_mae_layout.torch_args(base.model), **kwargs)
    assert [(k, tuple(v.shape)) for k, v in tm.state_dict().items()] == official, variant
    del tm
  with pytest.raises(ValueError, match="needs mlp_head"):
    cav_mae_layout.to_official(zeros, method.model, "finetune")
  _, tiny, tiny_params = _random_params("tiny")
  with pytest.raises(ValueError, match=r"mlp_head needs .* for embed_dim 64"):
    cav_mae_layout.to_official(tiny_params, tiny, "finetune", head)


def _checkpoint_params(workdir, step=4):  # the latest step of tiny_run, what export takes
  config = extract.training_config(workdir)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  method, params = extract.load_params(config, mesh, workdir, step, 0)
  return method.model, jax.tree.map(np.asarray, jax.device_get(params))


def test_export_cli_round_trip_is_bit_exact_and_loads_strictly(tiny_run, tmp_path):
  data, workdir = tiny_run
  model, params = _checkpoint_params(workdir)
  pth = str(tmp_path / "cav_mae.pth")
  subprocess.run([sys.executable, "-m", "avmae.export", f"--workdir={workdir}",
                  "--format=cav_mae", "--module_prefix", f"--out={pth}"], check=True, cwd=REPO)
  st = to_torch.export(workdir, str(tmp_path / "cav_mae.safetensors"))[0]
  for path in (pth, st):
    sd = files.load(path)
    assert all(k.startswith("module.") for k in sd) == (path == pth)
    back = cav_mae_layout.from_official(sd, model)
    jax.tree.map(np.testing.assert_array_equal, back, params)  # bit-exact
    meta = json.load(open(path + ".json"))
    assert meta["source"]["step"] == 4 and meta["preprocessing"]["features"]["mel_bins"] == 64
    tm = torch_cav_mae.CAVMAE(**meta["torch_cav_mae_args"])
    tm.load_state_dict({k.removeprefix("module."): torch.from_numpy(v) for k, v in sd.items()},
                       strict=True)
  assert list(files.load(pth)) == ["module." + k for k in cav_mae_layout.to_official(
      params, model)]  # .pth keeps the official order
  ft = to_torch.export(workdir, str(tmp_path / "ft.pth"), variant="finetune_audio",
                       num_classes=8)[0]
  meta = json.load(open(ft + ".json"))
  tm = torch_cav_mae.CAVMAE(**meta["torch_cav_mae_args"])
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in files.load(ft).items()}, strict=True)
  assert tm.classify(torch.zeros(2, 128, 64), None, "audioonly").shape == (2, 8)


def test_timm_export_gives_the_same_encoder_outputs(tiny_run, tmp_path):
  from timm.models.vision_transformer import VisionTransformer
  _, workdir = tiny_run
  model, params = _checkpoint_params(workdir)
  paths = to_torch.export(workdir, str(tmp_path / "enc.safetensors"), fmt="timm")
  assert [os.path.basename(p) for p in paths] == ["enc_audio.safetensors",
                                                  "enc_video.safetensors"]
  rng = np.random.default_rng(0)
  audio = rng.standard_normal((2, model.audio_frames, model.mel_bins)).astype(np.float32)
  frames = rng.standard_normal((2, model.image_size, model.image_size, 3)).astype(np.float32)
  states = model.apply({"params": params}, audio, frames, method="hidden_states")
  inputs = {"audio": torch.from_numpy(audio).transpose(1, 2)[:, None],
            "video": torch.from_numpy(frames).permute(0, 3, 1, 2)}
  for path, mode in zip(paths, ("audio", "video")):
    meta = json.load(open(path + ".json"))
    vit = VisionTransformer(**cav_mae_layout.timm_kwargs(meta["timm_args"])).eval()
    vit.load_state_dict({k: torch.from_numpy(v) for k, v in files.load(path).items()},
                        strict=True)
    with torch.no_grad():
      tokens = vit.forward_features(inputs[mode])
      pooled = vit(inputs[mode])
    error = _rel(states[mode][-1], tokens.numpy())
    print(f"timm {mode}: tokens max relative error {error:.1e}")
    assert error < 1e-5
    assert _rel(np.asarray(states[mode][-1]).mean(1), pooled.numpy()) < 1e-5


def test_import_cli_makes_a_workdir_that_trains_and_probes(tiny_run, tmp_path, capsys):
  data, workdir = tiny_run
  model, params = _checkpoint_params(workdir)
  official = str(tmp_path / "official.pth")
  files.save(official, {"module." + k: v for k, v in cav_mae_layout.to_official(
      params, model).items()}, {})
  config = cav_mae.get_config("tiny")
  config.data.dir, config.data.batch_size = data, 16
  config.total_steps, config.checkpoint_every_steps = 1, 1
  imported = str(tmp_path / "imported")
  subprocess.run([sys.executable, "-m", "avmae.import_torch", f"--checkpoint={official}",
                  f"--config={REPO}/configs/cav_mae.py:tiny", f"--workdir={imported}",
                  f"--config.data.dir={data}"], check=True, cwd=REPO)
  _, restored = _checkpoint_params(imported, step=0)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  with pytest.raises(ValueError, match="already has checkpoints"):
    import_checkpoint(official, config, imported)
  train.train(config, imported)  # continues pretraining from the imported step 0
  assert f"resumed from step 0 of {imported}" in capsys.readouterr().out
  assert extract.saved_steps(imported) == [0, 1]


def test_import_and_export_fail_loudly(tiny_run, tmp_path):
  _, workdir = tiny_run
  model, params = _checkpoint_params(workdir)
  sd = cav_mae_layout.to_official(params, model)
  path = str(tmp_path / "x.pth")
  files.save(path, sd, {})
  # Checkpoints of another architecture than the config's.
  shallow = cav_mae.get_config("tiny")
  shallow.model.modality_specific_depth = 1
  with pytest.raises(ValueError, match=r"x.pth: .*layout of this model: missing \[\], "
                                       r"unexpected \['blocks_a.1"):
    import_checkpoint(path, shallow, str(tmp_path / "a"))
  wide = cav_mae.get_config("tiny")
  wide.model.embed_dim = 128
  with pytest.raises(ValueError, match=r"x.pth: state_dict modality_a has shape "
                                       r"\(1, 1, 64\), this model needs \(1, 1, 128\)"):
    import_checkpoint(path, wide, str(tmp_path / "b"))
  files.save(path, cav_mae_layout.to_official(params, model, "finetune",
                                              cav_mae_layout.init_head(64, 3)), {})
  with pytest.raises(ValueError, match="an mlp_head: a finetuning model"):
    import_checkpoint(path, cav_mae.get_config("tiny"), str(tmp_path / "c"))
  files.save(path, sd, {})
  with open(path, "r+b") as f:  # a truncated download
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=r"x.pth: cannot read it as a .pth state_dict"):
    files.load(path)
  with pytest.raises(ValueError, match=r"norm.weight has shape \(3,\), this model needs"):
    cav_mae_layout.from_official(dict(sd, **{"norm.weight": np.zeros(3, np.float32)}), model)
  with pytest.raises(ValueError, match="unknown state_dict file type '.npy'"):
    to_torch.export(workdir, str(tmp_path / "x.npy"))
  torch.save({"epoch": 3}, path)  # a training-state file, not a state_dict
  with pytest.raises(ValueError, match="entry 'epoch' is not a tensor \\(int\\)"):
    files.load(path)


def test_torch_frontend_matches_the_numpy_pipeline():
  rng = np.random.default_rng(0)
  wave = (0.1 * rng.standard_normal(16000) + 0.3 * np.sin(np.arange(16000) * 0.05)
          ).astype(np.float32)
  for options in ({}, {"snip_edges": False, "window_type": "povey"},
                  {"frame_length": 30.0, "low_freq": 60.0, "high_freq": -400.0}):
    ref = features.kaldi_fbank(wave, 16000, 64, **options)
    got = torch_frontend.kaldi_fbank(torch.from_numpy(wave), 16000, 64, **options).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
  log_mel = rng.standard_normal((90, 64)).astype(np.float32)
  for frames in (100, 64):
    ref = augment.normalize_log_mel(augment.crop_or_pad(log_mel, frames), -4.0, 3.0)
    got = torch_frontend.prepare_audio(torch.from_numpy(log_mel), frames, -4.0, 3.0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
  images = rng.integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
  ref = np.stack([augment.normalize_image(augment.to_uint8(augment.resize_bilinear(
      im, (32, 32)))) for im in images]).transpose(0, 3, 1, 2)
  got = torch_frontend.prepare_frames(torch.from_numpy(images), 32, augment.IMAGE_MEAN.tolist(),
                                      augment.IMAGE_STD.tolist()).numpy()
  # Equal but where float rounding of a bilinear weight lands a value on the other side of .5.
  off = np.abs(got - ref) > 1e-5
  assert off.mean() < 0.01 and np.abs(got - ref).max() <= 1.01 / 255 / 0.224
  # The whole front end with an export's preprocessing metadata.
  meta = {"audio_frames": 100, "image_size": 32, "image_mean": augment.IMAGE_MEAN.tolist(),
          "image_std": augment.IMAGE_STD.tolist(), "log_mel_mean": -4.0, "log_mel_std": 3.0,
          "features": {"log_mel": "kaldi", "sample_rate": 16000, "mel_bins": 64,
                       "frame_length_ms": 25, "frame_shift_ms": 10}}
  audio, frames = torch_frontend.preprocess(torch.from_numpy(wave), torch.from_numpy(images),
                                            meta)
  ref_audio = augment.normalize_log_mel(augment.crop_or_pad(
      features.kaldi_fbank(wave, 16000, 64), 100), -4.0, 3.0)
  np.testing.assert_allclose(audio[0].numpy(), ref_audio, atol=1e-5, rtol=0)
  assert frames.shape == (3, 3, 32, 32)
