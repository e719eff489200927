"""Optimizer and learning-rate schedule from the config's `optimizer` section."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import ml_collections
import optax


def _step_decay(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Constant after warmup, times decay_factor from the first step of each epoch of
  decay_epochs (counted from 0; optax's boundary b applies from step b on): torch's MultiStepLR
  stepped once per epoch, as the official CAV-MAE loop does (tests/test_optim.py)."""
  boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
  return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)


def _cosine(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(cfg.learning_rate,
                                     max(total_steps - cfg.warmup_steps, 1))


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup over `warmup_steps`, then the `schedule` ("step" or "cosine")."""
  schedules: dict[str, Callable[[], optax.Schedule]] = {
      "step": lambda: _step_decay(cfg, steps_per_epoch),
      "cosine": lambda: _cosine(cfg, total_steps),
  }
  if cfg.schedule not in schedules:
    raise ValueError(f"config.optimizer.schedule={cfg.schedule!r}; one of {sorted(schedules)}")
  main = schedules[cfg.schedule]()
  if cfg.warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  if cfg.schedule == "step":  # the step schedule counts epochs from the start of training
    return lambda step: jax.numpy.where(step < cfg.warmup_steps, warmup(step), main(step))
  return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
  """True for parameters to decay: those whose path matches none of the `no_decay` regexes."""
  def keep(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return not any(re.search(p, name) for p in no_decay)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """Adam with torch-style L2 decay (added to the gradient, as torch.optim.Adam) or AdamW
  (decoupled), optional global-norm clipping first."""
  mask = lambda params: decay_mask(params, tuple(cfg.no_decay))
  decay = optax.add_decayed_weights(cfg.weight_decay, mask)
  adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  chains = {
      "adam": lambda: [decay, adam],
      "adamw": lambda: [adam, decay],
  }
  if cfg.name not in chains:
    raise ValueError(f"config.optimizer.name={cfg.name!r}; one of {sorted(chains)}")
  clip = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
  return optax.chain(*clip, *chains[cfg.name](), optax.scale_by_learning_rate(schedule))
