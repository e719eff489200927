"""avmae/optim.py against torch's own: the step schedule against MultiStepLR driven as the
official CAV-MAE loop drives it (src/traintest_cavmae.py: scheduler.step() after each epoch),
updates against torch.optim.Adam (coupled L2) and AdamW (decoupled), the no-decay mask,
global-norm clipping against clip_grad_norm_, and the official configs' Adam scaling against a
loss summed over 4 replicas."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from avmae import optim, sharding
from avmae.methods import METHODS
from configs import cav_mae

EPOCHS = 25  # the official runs' (egs/audioset/run_cavmae_pretrain_base.sh:32)


def _torch_lrs(lr: float, milestones, gamma: float, steps_per_epoch: int, epochs: int
               ) -> list[float]:
  """The lr of every optimizer step of an official run: MultiStepLR stepped per epoch."""
  opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr)
  scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma=gamma)
  lrs = []
  for _ in range(epochs):
    for _ in range(steps_per_epoch):
      lrs.append(opt.param_groups[0]["lr"])
      opt.step()
    scheduler.step()
  return lrs


@pytest.mark.parametrize("name", ["base_official", "scale_pp_official"])
@pytest.mark.parametrize("steps_per_epoch", [1, 3, 7])
def test_the_step_schedule_is_multisteplr_stepped_per_epoch(name, steps_per_epoch):
  cfg = cav_mae.get_config(name).optimizer
  # src/traintest_cavmae.py:57: milestones range(lrscheduler_start, 1000, lrscheduler_step)
  # (run_cavmae_pretrain_base.sh:33-35: 10, 0.5, 5), not only those inside the run.
  want = _torch_lrs(cfg.learning_rate, range(10, 1000, 5), 0.5, steps_per_epoch, EPOCHS)
  schedule = optim.learning_rate_schedule(cfg, EPOCHS * steps_per_epoch, steps_per_epoch)
  got = [float(schedule(jnp.int32(step))) for step in range(EPOCHS * steps_per_epoch)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert len(set(want)) == 4  # the lr did change three times


def _params(rng: np.random.Generator, dtype) -> dict:
  """A small tree with the model's kinds of parameter names."""
  r = lambda *shape: rng.standard_normal(shape).astype(dtype)
  return {"blocks_a_0": {"attn": {"qkv_kernel": r(6, 3, 2, 3), "qkv_bias": r(3, 2, 3)},
                         "norm1": {"scale": 1 + r(6), "bias": r(6)}},
          "modality_a": r(1, 1, 6), "mask_token": r(1, 1, 6),
          "patch_embed_a": {"kernel": r(4, 6), "bias": r(6)}}


def _optimizer_config(**overrides) -> ml_collections.ConfigDict:
  cfg = cav_mae.get_config("tiny").optimizer
  cfg.update(dict(warmup_steps=0, schedule="step", decay_epochs=(1, 2), decay_factor=0.5,
                  learning_rate=0.01, weight_decay=0.3, grad_clip_norm=0.0))
  cfg.update(overrides)
  return cfg


def _run_both(cfg, torch_optimizer, grads: list, params: dict, steps_per_epoch: int,
              grad_scale: float = 1.0, clip: float = 0.0, torch_cfg=None):
  """The parameters after each step: avmae's optimizer of `cfg` on `grads`; torch's (the same
  param groups, MultiStepLR over cfg.decay_epochs stepped per epoch; lr, betas, decay and eps
  of torch_cfg, default cfg) on grads * grad_scale, clipped by clip_grad_norm_ when `clip`."""
  torch_cfg = torch_cfg or cfg
  schedule = optim.learning_rate_schedule(cfg, len(grads), steps_per_epoch)
  tx = optim.make_optimizer(cfg, schedule)
  p, state = params, tx.init(params)
  update = jax.jit(tx.update)
  names = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  decays = jax.tree.leaves(optim.decay_mask(params, tuple(cfg.no_decay)))
  leaves = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in jax.tree.leaves(params)]
  groups = [{"params": [t for t, d in zip(leaves, decays) if d == want],
             "weight_decay": torch_cfg.weight_decay if want else 0.0} for want in (True, False)]
  opt = torch_optimizer([g for g in groups if g["params"]], lr=torch_cfg.learning_rate,
                        betas=(torch_cfg.b1, torch_cfg.b2), eps=torch_cfg.eps)
  scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.decay_epochs),
                                                   gamma=cfg.decay_factor)
  out = []
  for step, g in enumerate(grads):
    updates, state = update(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
    for t, gl in zip(leaves, jax.tree.leaves(g)):
      t.grad = torch.tensor(np.asarray(gl)) * grad_scale
    if clip:
      torch.nn.utils.clip_grad_norm_(leaves, clip)
    opt.step()
    if (step + 1) % steps_per_epoch == 0:
      scheduler.step()
    out.append(({n: np.asarray(x) for n, x in zip(names, jax.tree.leaves(p))},
                {n: t.detach().numpy().copy() for n, t in zip(names, leaves)}))
  return out


def _grads(params, steps: int, seed: int = 1, scale: float = 1.0) -> list:
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype),
                       params) for _ in range(steps)]


def _assert_same(out, rtol: float, atol: float) -> None:
  for step, (ours, theirs) in enumerate(out):
    for name in ours:
      np.testing.assert_allclose(ours[name], theirs[name], rtol=rtol, atol=atol,
                                 err_msg=f"step {step} {name}")


CASES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_updates_match_torch(name, dtype):
  """Six steps over three epochs of two (the lr halves twice), decay on the kernels only."""
  cfg = _optimizer_config(name=name)
  with jax.enable_x64(dtype == np.float64):
    params = _params(np.random.default_rng(0), dtype)
    out = _run_both(cfg, CASES[name], _grads(params, 6), params, steps_per_epoch=2)
  tol = {np.float32: (2e-6, 1e-6), np.float64: (1e-12, 1e-13)}[dtype]
  _assert_same(out, *tol)
  moved = out[-1][0]["patch_embed_a/kernel"] - params["patch_embed_a"]["kernel"]
  assert np.abs(moved).max() > 0.01  # six steps of lr 0.01 to 0.0025


def test_coupled_and_decoupled_decay_differ():
  """The test above can tell them apart: torch's Adam is not AdamW on these steps."""
  cfg = _optimizer_config(name="adam")
  params = _params(np.random.default_rng(0), np.float32)
  out = _run_both(cfg, torch.optim.AdamW, _grads(params, 6), params, steps_per_epoch=2)
  with pytest.raises(AssertionError):
    _assert_same(out, 2e-6, 1e-6)


def test_clipping_matches_clip_grad_norm():
  """Global-norm clipping before everything else, as clip_grad_norm_ before AdamW's step;
  the gradients' norm (about 9) is over the limit in every step, then under it."""
  params = _params(np.random.default_rng(0), np.float32)
  cfg = _optimizer_config(name="adamw", grad_clip_norm=1.5)
  grads = _grads(params, 4) + _grads(params, 2, seed=2, scale=0.05)
  norms = [float(np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in jax.tree.leaves(g))))
           for g in grads]
  assert min(norms[:4]) > 1.5 > max(norms[4:])
  _assert_same(_run_both(cfg, torch.optim.AdamW, grads, params, 2, clip=1.5), 2e-6, 1e-6)
  with pytest.raises(AssertionError):  # unclipped torch: other numbers
    _assert_same(_run_both(cfg, torch.optim.AdamW, grads, params, 2), 2e-6, 1e-6)


def test_the_official_adam_scaling_is_the_loss_summed_over_4_replicas():
  """configs/cav_mae.py:base_official on the gradient of avmae's mean loss = torch.optim.Adam
  with the official decay and eps (src/traintest_cavmae.py:50) on the gradient of the loss
  summed over the 4 replicas (:94), 4x. Small gradients, so that both decay and eps count."""
  cfg = cav_mae.get_config("base_official").optimizer
  replicas = 4
  official = ml_collections.ConfigDict({**cfg.to_dict(), "weight_decay": 5e-7, "eps": 1e-8})
  with jax.enable_x64(True):
    params = _params(np.random.default_rng(0), np.float64)
    grads = _grads(params, 30, scale=2e-7)
    scaled = _run_both(cfg, torch.optim.Adam, grads, params, steps_per_epoch=1,
                       grad_scale=replicas, torch_cfg=official)
    unscaled = _run_both(official, torch.optim.Adam, grads, params, steps_per_epoch=1,
                         grad_scale=replicas)
  # Deltas, not parameters: an lr of 5e-5 moves them by little.
  start = {n: np.asarray(x) for n, x in zip(scaled[0][0], jax.tree.leaves(params))}
  delta = lambda out: [({n: a[n] - start[n] for n in a}, {n: b[n] - start[n] for n in b})
                       for a, b in out]
  _assert_same(delta(scaled), 1e-9, 1e-16)
  with pytest.raises(AssertionError):  # the official values unscaled: other updates
    _assert_same(delta(unscaled), 1e-3, 0)


# ----------------------------------------------------------------------------- no-decay mask

def _kind(name: str, shape: tuple[int, ...]) -> str:
  """What a parameter is, from its module's naming and shape: a weight matrix or conv kernel,
  a learned token or embedding [1, 1, D], or a vector (biases, incl. the fused qkv bias [3, H,
  Dh]; LayerNorm scales and biases; Swin-v2's tau)."""
  if name.split("/")[-1].endswith("kernel"):
    return "kernel"
  if shape[:2] == (1, 1) and len(shape) == 3:
    return "token"
  assert len(shape) == 1 or name.endswith("qkv_bias"), (name, shape)  # torch 1-D
  return "vector"


# What each recipe decays: configs/cav_mae.py and av_mae.py the kernels only; audio_mae.py
# timm's add_weight_decay (every 1-D parameter exempt: tokens [1, 1, D] decay); the official
# CAV-MAE runs every trainable parameter (src/traintest_cavmae.py:47-50, one group).
DECAYED = {("cav_mae", "tiny"): {"kernel"}, ("av_mae", "tiny"): {"kernel"},
           ("audio_mae", "tiny"): {"kernel", "token"},
           ("cav_mae", "base_official"): {"kernel", "token", "vector"}}


@pytest.mark.parametrize("module,size", sorted(DECAYED))
def test_the_no_decay_mask_covers_what_the_recipe_exempts(module, size):
  config = importlib.import_module(f"configs.{module}").get_config(size)
  if size != "tiny":  # the same parameter names at the tiny widths
    config.model = importlib.import_module(f"configs.{module}").get_config("tiny").model
  method = METHODS[config.method](config)
  params = sharding.strip_logical_names(jax.eval_shape(
      lambda: method.init(jax.random.key(0), method.example_batch(2)))["params"])
  mask = optim.decay_mask(params, tuple(config.optimizer.no_decay))
  kinds = set()
  for (path, x), decayed in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(mask)):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    kinds.add(_kind(name, x.shape))
    assert decayed == (_kind(name, x.shape) in DECAYED[module, size]), name
  assert kinds >= {"kernel", "vector"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_step_that_is_not_finite_leaves_the_state_as_it_was(name):
  """update(..., finite=False) returns the state it was given, counts and moments alike (the
  train step keeps the parameters): the next finite steps then equal those of a run that never
  saw the skipped one, and finite=True equals optax's own Adam chain."""
  cfg = _optimizer_config(name=name, grad_clip_norm=1.5)
  params = _params(np.random.default_rng(0), np.float32)
  grads = _grads(params, 3)
  tx = optim.make_optimizer(cfg, optim.learning_rate_schedule(cfg, 3, 2))
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(grads[0], state, params, finite=True)
  bad = jax.tree.map(lambda g: jnp.asarray(g).at[(0,) * g.ndim].set(np.nan), grads[1])
  _, kept = update(bad, state, params, finite=False)
  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  skipped, _ = update(grads[2], kept, params, finite=True)
  direct, _ = update(grads[2], state, params)  # `finite` defaults to True
  reference = optax.chain(
      optax.clip_by_global_norm(1.5),
      *({"adam": lambda d, a: [d, a], "adamw": lambda d, a: [a, d]}[name](
          optax.add_decayed_weights(cfg.weight_decay,
                                    lambda p: optim.decay_mask(p, tuple(cfg.no_decay))),
          optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))),
      optax.scale_by_learning_rate(optim.learning_rate_schedule(cfg, 3, 2)))
  ref_state = reference.init(params)
  _, ref_state = reference.update(grads[0], ref_state, params)
  ref, _ = reference.update(grads[2], ref_state, params)
  for a, b, c in zip(jax.tree.leaves(skipped), jax.tree.leaves(direct), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6, atol=1e-9)
