"""The official CAV-MAE pretraining starts from ImageNet MAE weights: facebookresearch/mae ViT
checkpoints map as the official adapt_vmae_weights.py does, and its output (`IN-initial.pth`,
with cls tokens CAVMAE lacks) imports with those keys listed and ignored."""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from avmae.export import cav_mae_layout
from avmae.methods import METHODS
from avmae.models.vit import sincos_2d
from configs import cav_mae

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mae_vit(config, seed=0):
  """A random facebookresearch/mae `MaskedAutoencoderViT` state_dict of the tiny CAV-MAE's
  widths: depth = modality-specific + shared blocks, an RGB patch embedding, a decoder."""
  m, rng = config.model, np.random.default_rng(seed)
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  d, dd, p = m.embed_dim, m.decoder_embed_dim, m.patch_size
  grid = m.image_size // p
  pos = lambda dim: np.concatenate([np.zeros((1, dim)), sincos_2d(dim, grid, grid)])[None]
  sd = {"cls_token": r(1, 1, d), "pos_embed": pos(d).astype(np.float32),
        "patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d)}
  block = lambda prefix, w: {f"{prefix}.{k}": r(*s) for k, s in (
      ("norm1.weight", (w,)), ("norm1.bias", (w,)), ("attn.qkv.weight", (3 * w, w)),
      ("attn.qkv.bias", (3 * w,)), ("attn.proj.weight", (w, w)), ("attn.proj.bias", (w,)),
      ("norm2.weight", (w,)), ("norm2.bias", (w,)), ("mlp.fc1.weight", (4 * w, w)),
      ("mlp.fc1.bias", (4 * w,)), ("mlp.fc2.weight", (w, 4 * w)), ("mlp.fc2.bias", (w,)))}
  for i in range(m.modality_specific_depth + m.shared_depth):
    sd.update(block(f"blocks.{i}", d))
  sd.update({"norm.weight": r(d), "norm.bias": r(d), "mask_token": r(1, 1, dd),
             "decoder_pos_embed": pos(dd).astype(np.float32),
             "decoder_embed.weight": r(dd, d), "decoder_embed.bias": r(dd)})
  for i in range(m.decoder_depth):
    sd.update(block(f"decoder_blocks.{i}", dd))
  sd.update({"decoder_norm.weight": r(dd), "decoder_norm.bias": r(dd),
             "decoder_pred.weight": r(p * p * 3, dd), "decoder_pred.bias": r(p * p * 3)})
  return sd


def _reference(mae, initial, specific):
  """adapt_vmae_weights.py, transcribed to NumPy dict operations: a strict=False load of the
  shared names, then the additional weights and the replaced parameters."""
  out = dict(initial)
  for k, v in mae.items():  # mae_mdl.load_state_dict(mdl_weight, strict=False)
    if k in out:
      out[k] = v
  for k, v in mae.items():
    if "blocks" in k and "decoder" not in k:
      block = int(k.split(".")[1])
      name = ".".join(k.split(".")[2:])
      if block <= specific - 1:
        out["blocks_a." + k[7:]] = v
        out["blocks_v." + k[7:]] = v
      else:
        out[f"blocks_u.{block - specific}.{name}"] = v
  for block in range(specific, 1 + max(int(k.split(".")[1]) for k in mae if k.startswith("blocks."))):
    for norm in ("norm1", "norm2"):
      for m in ("a", "v"):
        for leaf in ("weight", "bias"):
          out[f"blocks_u.{block - specific}.{norm}_{m}.{leaf}"] = mae[f"blocks.{block}.{norm}.{leaf}"]
  for m in ("a", "v"):
    out[f"norm_{m}.weight"], out[f"norm_{m}.bias"] = mae["norm.weight"], mae["norm.bias"]
  out["pos_embed_v"] = mae["pos_embed"][:, 1:]
  out["decoder_pos_embed_v"] = mae["decoder_pos_embed"][:, 1:]
  out["patch_embed_a.proj.weight"] = mae["patch_embed.proj.weight"].sum(1)[:, None]
  out["patch_embed_a.proj.bias"] = mae["patch_embed.proj.bias"]
  out["patch_embed_v.proj.weight"] = mae["patch_embed.proj.weight"]
  out["patch_embed_v.proj.bias"] = mae["patch_embed.proj.bias"]
  audio = initial["decoder_pred_a.weight"].shape[0]  # 256 at base: p * p
  out["decoder_pred_a.weight"] = mae["decoder_pred.weight"][:audio]
  out["decoder_pred_a.bias"] = mae["decoder_pred.bias"][:audio]
  out["decoder_pred_v.weight"] = mae["decoder_pred.weight"]
  out["decoder_pred_v.bias"] = mae["decoder_pred.bias"]
  return out


def test_a_mae_vit_maps_as_adapt_vmae_weights(capsys):
  config = cav_mae.get_config("tiny")
  method = METHODS["cav_mae"](config)
  mae = _mae_vit(config)
  params = method.import_state_dict(mae)
  initial = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(lambda: method.init(
      jax.random.key(config.seed), method.example_batch(1)))())["params"])
  initial_sd = cav_mae_layout.to_official(initial, method.model)
  want = _reference(mae, initial_sd, config.model.modality_specific_depth)
  got = cav_mae_layout.to_official(params, method.model)
  assert list(got) == list(initial_sd)
  for key in got:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)
  # What the MAE does not cover stays at our initialisation, and is listed.
  out = capsys.readouterr().out
  assert "initialised, not loaded" in out and "'modality_a'" in out
  assert "'blocks_a.0.norm1_a.weight'" in out and "'blocks_u.0.norm1_a.weight'" not in out
  np.testing.assert_array_equal(got["modality_a"], initial_sd["modality_a"])
  # The round trip into the official layout keeps the mapped weights.
  again = cav_mae_layout.to_official(method.import_state_dict(got), method.model)
  assert all(np.array_equal(again[k], got[k]) for k in got)


def test_a_mae_vit_of_another_depth_is_refused():
  config = cav_mae.get_config("tiny")
  mae = _mae_vit(config)
  mae = {k: v for k, v in mae.items() if not k.startswith("blocks.2.")}
  with pytest.raises(ValueError, match="the MAE ViT has 2 blocks; this CAVMAE takes 2 per "
                                       "modality and 1 shared"):
    METHODS["cav_mae"](config).import_state_dict(mae)


def test_an_in_initial_file_imports_and_lists_its_extra_keys(tmp_path):
  config = cav_mae.get_config("tiny")
  method = METHODS["cav_mae"](config)
  params = method.import_state_dict(_mae_vit(config))
  sd = cav_mae_layout.to_official(params, method.model)
  cls = np.ones((1, 1, config.model.embed_dim), np.float32)
  path = tmp_path / "IN-initial.pth"
  torch.save({**{k: torch.from_numpy(v) for k, v in sd.items()},
              **{k: torch.from_numpy(cls) for k in ("cls_token_a", "cls_token_v", "cls_token_av")}},
             path)
  run = subprocess.run([sys.executable, "-m", "avmae.import_torch", f"--checkpoint={path}",
                        "--config=configs/cav_mae.py:tiny", f"--workdir={tmp_path / 'w'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  assert ("ignored keys CAVMAE does not have (as the official strict=False load): "
          "['cls_token_a', 'cls_token_v', 'cls_token_av']") in run.stdout
  # Only those: any other extra key still fails, naming it.
  with pytest.raises(ValueError, match=r"unexpected \['cls_token'\]"):
    method.import_state_dict({**sd, "cls_token": cls})
