"""Multi-process start-up and faults: jax.distributed, preemption, a peer that dies.

- `initialize`: `--distributed` lets jax.distributed detect the cluster (TPU VMs, GKE, SLURM,
  Open MPI); `--coordinator/--num_processes/--process_id` name it. Either way the coordination
  service's timeouts come from `config.distributed`.
- A process that dies (SIGKILL, a crash, a lost host) stops sending heartbeats; after
  `config.distributed.heartbeat_timeout_seconds` the coordination service tells every other
  process, which then terminates with "Terminating process because the JAX distributed service
  detected fatal errors. This most likely indicates that another task died" and the dead
  task named. On TPUs a collective would otherwise wait for the dead peer forever; on CPUs
  gloo may fail it first ("Connection reset by peer"), and the exit's shutdown barrier then
  ends with the same message. If the peer died while sending, gloo aborts the survivor from
  its own thread with "Received data size doesn't match expected size. Is there a distributed
  collective mismatch in your code?": there it means a peer died, not a mismatch.
- `Preemption`: SIGTERM to any one process makes every process save the same step and stop.
"""

from __future__ import annotations

import signal

import jax
import ml_collections
from jax.experimental import multihost_utils


def initialize(config: ml_collections.ConfigDict, *, auto: bool, coordinator: str | None,
               num_processes: int, process_id: int) -> bool:
  """Joins jax.distributed when asked (`auto`: detected from the environment; or more than one
  process named); returns whether it did. Call before anything starts a JAX backend."""
  if auto and (coordinator or num_processes > 1):
    raise ValueError("--distributed detects the cluster itself; drop --coordinator, "
                     "--num_processes and --process_id (or --distributed)")
  d = config.distributed
  timeouts = dict(initialization_timeout=d.initialization_timeout_seconds,
                  heartbeat_timeout_seconds=d.heartbeat_timeout_seconds,
                  shutdown_timeout_seconds=d.shutdown_timeout_seconds)
  if auto:
    jax.distributed.initialize(**timeouts)
  elif num_processes > 1:
    jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
  else:
    return False
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices; a peer that stops "
        f"answering for {d.heartbeat_timeout_seconds} s stops every process", flush=True)
  return True


class Preemption:
  """SIGTERM -> a step at which every process saves and stops (`reached(step)`).

  Under jax.distributed the preemption sync manager owns SIGTERM: `initialize` installs its
  notifier, a notice to any one process reaches all of them, and
  `reached_preemption_sync_point(step)` (orbax's `reached_preemption`) turns True at the same
  step everywhere (one past the largest step any process had reached). It must be asked at
  every step, by every process, with the same steps. A Python SIGTERM handler would replace
  that notifier: the signalled process alone would start a collective save while the others
  ran the next step, and both would wait for each other forever. Without jax.distributed (one
  process) a Python handler sets a flag; `close` puts the previous handler back.
  """

  def __init__(self):
    self._synced = (jax.distributed.is_initialized()
                    and jax.config.jax_enable_preemption_service)
    self._signalled = False
    self._previous = None
    if not self._synced:
      previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._previous = signal.SIG_DFL if previous is None else previous  # None: set in C

  def _on_sigterm(self, *_) -> None:
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
