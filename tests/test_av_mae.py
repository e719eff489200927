"""Audiovisual MAE: every encoder x decoder strategy builds, trains a step and matches the
exported PyTorch module; the official masking counts, loss and position embeddings."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from avmae import checkpoint, flops, masking, sharding, train
from avmae.export import torch_av_mae
from avmae.methods import av_mae as av_mae_method
from avmae.models import av_mae, vit
from configs import av_mae as av_mae_config

# Every combination official allows (separate encoders with separate decoders is refused),
# and inpainting with the released strategies.
STRATEGIES = [(e, d, False) for e, d in itertools.product(av_mae.ENCODERS, av_mae.DECODERS)
              if (e, d) != ("separate_encoders", "separate_decoders")]
STRATEGIES.append(("separate_encoders_and_concat", "same_decoder", True))
STRATEGIES.append(("concat_and_encode", "concat_and_decode", True))


def _config(encoder="separate_encoders_and_concat", decoder="same_decoder", inpainting=False):
  c = av_mae_config.get_config("tiny")
  c.model.update(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                 decoder_num_heads=2, fusion_layers=1, audio_frames=64, mel_bins=32,
                 image_size=32, num_frames=4, encoder_strategy=encoder,
                 decoder_strategy=decoder, use_inpainting=inpainting)
  c.data.update(audio_frames=64, image_size=32, num_frames=4, batch_size=4)
  c.optimizer.warmup_steps = 0  # the first step moves the parameters
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, m = config.data.batch_size, config.model
  return {"audio": rng.standard_normal((b, m.audio_frames, m.mel_bins)).astype(np.float32),
          "frames": rng.integers(0, 256, (b, m.num_frames, m.image_size, m.image_size, 3),
                                 dtype=np.uint8),
          "valid": np.ones((b,), bool)}


def _rel(ref, got) -> float:
  ref = np.asarray(ref, np.float64)
  return float(np.abs(ref - np.asarray(got, np.float64)).max() / np.abs(ref).max())


@pytest.mark.parametrize("encoder,decoder,inpainting", STRATEGIES)
def test_each_strategy_trains_a_step_and_matches_pytorch(encoder, decoder, inpainting):
  config = _config(encoder, decoder, inpainting)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  program = train.build_program(config, mesh, steps_per_epoch=10)
  method = program.method
  rules = tuple(tuple(r) for r in config.sharding_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda: nn.meta.unbox(train.init_state(
        method, program.optimizer, method.example_batch(4), config.seed)))()
    params0 = jax.tree.map(np.asarray, state["params"])
    assert set(k for k in params0 if k[-1].isdigit() or k.endswith("_norm")) == {
        f"{s}_{i}" for s, n in method.model.layer_stacks.items() for i in range(n)} | {
        f"{s}_norm" for s in method.model.layer_stacks}
    batch = _batch(config)
    moved = []
    for _ in range(2):
      state, metrics = program.train_step(state, batch)
      params = jax.tree.map(np.asarray, state["params"])
      moved.append({k for k in params0 if not np.array_equal(
          jax.tree.leaves(params0[k])[0], jax.tree.leaves(params[k])[0])})
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  np.testing.assert_allclose(float(metrics["loss"]), 0.5 * float(metrics["loss_mae_a"])
                             + 0.5 * float(metrics["loss_mae_v"]), rtol=1e-6)
  # The zero-initialised output heads (official) pass no gradient on at first: one step
  # moves only them, the second every parameter group.
  assert moved == [{"decoder_pred_a", "decoder_pred_v"}, set(params0)]

  # The exported state_dict in the PyTorch module: predictions and probe features.
  [(_, sd, meta)] = method.export(params, "av_mae", {})
  tm = torch_av_mae.AVMAE(**meta["torch_av_mae_args"])
  tm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                     strict=True)
  mask_a, mask_v = method.masks(masking.example_keys(jax.random.key(5), 4))
  frames = av_mae_method.scale_pixels(batch["frames"])
  out = jax.jit(lambda p: method.model.apply({"params": p}, batch["audio"], frames, mask_a,
                                             mask_v))(params)
  feats = jax.jit(method.features)(params, batch)
  t_frames = torch.from_numpy(np.asarray(frames)).permute(0, 4, 1, 2, 3)
  t_audio = torch.from_numpy(batch["audio"])
  ids = [torch.from_numpy(np.asarray(x, np.int64)) for x in
         (mask_a.ids_keep, mask_a.ids_restore, mask_v.ids_keep, mask_v.ids_restore)]
  with torch.no_grad():
    t_out = tm(t_audio, t_frames, *ids)
    t_feats = tm.features(t_audio, t_frames)
  errors = {k: _rel(out[k], t_out[k].numpy()) for k in out}
  errors.update({k: _rel(feats[k], t_feats[k].numpy()) for k in t_feats})
  assert max(errors.values()) < 1e-5, errors


def test_official_mask_counts_and_random_order():
  # int(ratio * L) masked: 1568 video tokens at 0.9 keep 157, 496 spectrogram at 0.7 keep 149.
  assert av_mae.num_visible(1568, 0.9) == 157 and av_mae.num_visible(496, 0.7) == 149
  assert masking.num_visible(1568, 0.9) == 156  # CAV-MAE's rounding differs
  config = av_mae_config.get_config("large")
  model = av_mae_method.build(config).model
  assert model.num_tokens == {"a": 62 * 8, "v": 8 * 14 * 14}  # VALID: 1000 frames -> 62
  mask_a, mask_v = av_mae_method.build(config).masks(masking.example_keys(jax.random.key(0), 3))
  assert mask_a.ids_keep.shape == (3, 149) and mask_v.ids_keep.shape == (3, 157)
  np.testing.assert_array_equal(np.asarray(mask_v.mask).sum(1), 1411)
  assert len({tuple(np.asarray(r)) for r in mask_v.ids_keep}) == 3  # per example


def test_released_layer_stacks_and_parameter_count():
  model = av_mae_method.build(av_mae_config.get_config("large")).model
  assert model.layer_stacks == {"encoder_a": 22, "encoder_v": 22, "encoder_fusion": 2,
                                "decoder": 4}
  params = jax.eval_shape(lambda: av_mae_method.build(av_mae_config.get_config("large")).init(
      jax.random.key(0), av_mae_method.build(av_mae_config.get_config("large")).example_batch(1)))
  count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))
  # ViT-L: 24 blocks of 12.6 M per modality path, 2 shared; decoder 4 x 3.15 M; embeddings.
  block = lambda d: 12 * d * d + 13 * d
  expected = (44 + 2) * block(1024) + 3 * 2 * 1024 + 4 * block(512) + 2 * 512 + (
      (256 + 1) * 1024 + (1536 + 1) * 1024          # patch embeddings
      + 2 * (1024 * 512 + 512) + 2 * 512            # decoder projections, mask tokens
      + (512 * 256 + 256) + (512 * 1536 + 1536))    # output heads
  assert count == expected, (count, expected)


@pytest.mark.parametrize("standardise", [False, True])
def test_loss_is_the_official_masked_per_element_mse(standardise):
  config = _config(inpainting=False)
  config.loss.standardise_per_patch = standardise
  method = av_mae_method.build(config)
  batch = _batch(config, seed=1)
  params = method.init(jax.random.key(0), batch)["params"]
  # A non-zero output head, so that predictions differ from zero.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.01 * jnp.arange(x.size).reshape(x.shape) / x.size
      if "decoder_pred" in jax.tree_util.keystr(path) else x, nn.meta.unbox(params))
  keys = masking.example_keys(jax.random.key(2), 4)
  loss, metrics = method.loss_fn(params, batch, keys)
  mask_a, mask_v = method.masks(keys)
  frames = batch["frames"].astype(np.float64) / 127.5 - 1
  out = method.model.apply({"params": params}, batch["audio"], jnp.asarray(frames, jnp.float32),
                           mask_a, mask_v)
  p = 8
  audio = batch["audio"].astype(np.float64)  # time-major patches, values (time, frequency)
  b, t, f = audio.shape
  target_a = audio.reshape(b, t // p, p, f // p, p).transpose(0, 1, 3, 2, 4).reshape(b, -1, p * p)
  target_v = frames.reshape(b, 2, 2, 4, p, 4, p, 3).transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(
      b, 32, -1)
  expected = {}
  for name, target, pred, mask in (("a", target_a, out["pred_a"], mask_a),
                                   ("v", target_v, out["pred_v"], mask_v)):
    if standardise:  # jax.nn.standardize(axis=-1, epsilon=1e-6): biased variance
      target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
          target.var(-1, keepdims=True) + 1e-6)
    err = ((np.asarray(pred, np.float64) - target) ** 2).sum(-1)
    w = np.asarray(mask.mask, np.float64)
    expected[name] = (err * w).sum() / (w.sum() + 1e-8) / target.shape[-1]
  np.testing.assert_allclose(metrics["loss_mae_a"], expected["a"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_mae_v"], expected["v"], rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * expected["a"] + 0.5 * expected["v"], rtol=1e-5)


def test_inpainting_counts_positions_after_the_other_modalitys_visible_tokens():
  model = av_mae_method.build(_config(inpainting=True)).model
  keys = masking.example_keys(jax.random.key(0), 2)
  masks = dict(zip("av", av_mae_method.build(_config(inpainting=True)).masks(keys)))
  counted = model.prediction_masks(masks)
  visible = {m: masks[m].ids_keep.shape[1] for m in "av"}  # 10 audio, 4 video of 32 each
  assert visible == {"a": 10, "v": 4}
  np.testing.assert_array_equal(counted["a"][0], np.arange(32) >= 4)
  np.testing.assert_array_equal(counted["v"][1], np.arange(32) >= 10)


def test_sincos_1d_interleaved_is_scenics_formula():
  got = vit.sincos_1d_interleaved(8, 5)
  pos, k = np.arange(5)[:, None], np.arange(4)[None]
  angle = pos / 10000 ** (2 * k / 8)
  np.testing.assert_allclose(got[:, 0::2], np.sin(angle), atol=1e-6)
  np.testing.assert_allclose(got[:, 1::2], np.cos(angle), atol=1e-6)
  np.testing.assert_allclose(torch_av_mae.sincos_1d_interleaved(8, 5).numpy(), got, atol=1e-7)


@pytest.mark.parametrize("key,value,match", [
    ("model.decoder_strategy", "separate_decoders", "trains two unrelated models"),
    ("model.encoder_strategy", "late", r"'late'; one of \["),
    ("model.fusion_layers", 2, r"config.model.fusion_layers=2; mid fusion needs 0 < fusion"),
    ("model.use_inpainting", True, r"fewer visible audio tokens \(10\) than frames tokens"),
])
def test_config_checks_name_the_key(key, value, match, tmp_path):
  config = _config()
  if key == "model.decoder_strategy":
    config.model.encoder_strategy = "separate_encoders"
  if key == "model.use_inpainting":
    config.model.image_size = config.data.image_size = 16  # 8 video tokens
  section, leaf = key.split(".")
  config[section][leaf] = value
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  info = {"features": {"mel_bins": 32}}
  with pytest.raises(ValueError, match=match):
    train.validate(config, info, mesh)


def test_analytic_flops_agree_with_xla():
  config = _config()
  method = av_mae_method.build(config)
  batch = jax.tree.map(jnp.asarray, _batch(config))
  keys = masking.example_keys(jax.random.key(0), 4)
  params = nn.meta.unbox(jax.eval_shape(lambda: method.init(jax.random.key(0), batch)))["params"]
  forward = jax.jit(lambda p: method.loss_fn(p, batch, keys)[0]).lower(params).compile()
  xla = forward.cost_analysis()["flops"]
  analytic = 4 * flops.av_mae_forward_flops(config.model, config.masking)
  assert 0.9 < xla / analytic < 1.3, (xla, analytic)


@pytest.mark.parametrize("size", av_mae_config.MODEL_SIZES)
def test_every_size_builds_and_large_is_the_released_recipe(size):
  config = av_mae_config.get_config(size)
  config.lock()
  method = av_mae_method.build(config)
  shapes = jax.eval_shape(lambda: method.init(jax.random.key(0), method.example_batch(2)))
  assert jax.tree.leaves(shapes)
  if size == "large":
    assert (config.data.batch_size, config.optimizer.learning_rate, config.optimizer.warmup_steps,
            config.total_steps) == (512, 6e-4, 4 * 3627, 120 * 3627)
    assert (config.data.num_frames, config.data.frame_stride, config.data.audio_frames) == (
        16, 4, 1000)
    assert (config.masking.ratio_a, config.masking.ratio_v) == (0.7, 0.9)


def test_tube_masks_repeat_over_time_with_videomaes_count():
  config = _config()
  config.masking.mode_v = "tube"  # 2 time slots of 16 tokens; int(0.9 * 16) = 14 masked each
  method = av_mae_method.build(config)
  _, mask_v = method.masks(masking.example_keys(jax.random.key(0), 3))
  per_slot = np.asarray(mask_v.mask).reshape(3, 2, 16)
  np.testing.assert_array_equal(per_slot[:, 0], per_slot[:, 1])
  np.testing.assert_array_equal(per_slot.sum(-1), 14)
  assert mask_v.ids_keep.shape == (3, 4) == (3, av_mae.num_visible(32, 0.9, "tube", 2))


def test_scanned_stacks_give_the_unrolled_loss_and_export():
  unrolled_config, scanned_config = _config(), _config()
  scanned_config.model.scan_layers = True
  unrolled, scanned = (av_mae_method.build(c) for c in (unrolled_config, scanned_config))
  batch = _batch(unrolled_config, seed=3)
  params = nn.meta.unbox(unrolled.init(jax.random.key(0), batch))["params"]
  stacked = checkpoint.convert_layers(params, scanned.model.layer_stacks, scan_layers=True)
  assert stacked["encoder_a"]["attn"]["qkv_kernel"].shape[0] == 1  # depth 2 - fusion 1
  keys = masking.example_keys(jax.random.key(1), 4)
  loss_u, _ = jax.jit(unrolled.loss_fn)(params, batch, keys)
  loss_s, _ = jax.jit(scanned.loss_fn)(stacked, batch, keys)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  [(_, sd_u, _)] = unrolled.export(jax.tree.map(np.asarray, params), "av_mae", {})
  [(_, sd_s, _)] = scanned.export(jax.tree.map(np.asarray, stacked), "av_mae", {})
  assert sd_u.keys() == sd_s.keys()
  for k in sd_u:
    np.testing.assert_array_equal(sd_u[k], sd_s[k])
