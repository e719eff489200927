"""What a training run reports: metrics.jsonl / TensorBoard / stdout, step times and MFU, a
profiler trace of chosen steps."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Iterator, Sequence

import jax

from avmae import storage


class MetricWriter:
  """metrics.jsonl, TensorBoard events and stdout, written by process 0 only.

  A run that resumes from step k keeps the records of steps <= k and drops the rest (steps a
  killed run logged after its last checkpoint run again), so every step is in metrics.jsonl
  once; TensorBoard is told to purge events after step k. On a bucket, where an object cannot
  be appended to, metrics.jsonl is rewritten whole every `REMOTE_FLUSH_SECONDS`, at each
  `flush()` (the trainer's, once a checkpoint's step is logged) and at the end.
  """

  REMOTE_FLUSH_SECONDS = 30.0

  def __init__(self, workdir: str, start_step: int):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter
    self._path = storage.path(workdir) / "metrics.jsonl"
    self._remote = storage.is_remote(self._path)
    self._lines: list[str] = []  # on a bucket: every record, written whole
    purge_step = None
    if self._path.exists():
      kept = [line for line in self._path.read_text().splitlines(keepends=True)
              if _step_of(line) is not None and _step_of(line) <= start_step]
      storage.write(self._path, "".join(kept))
      purge_step = start_step + 1
      self._lines = kept if self._remote else []
    self._jsonl = None if self._remote else self._path.open("a")
    self._flushed = time.monotonic()
    self._tb = SummaryWriter(str(storage.path(workdir) / "tensorboard"), purge_step=purge_step)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    line = json.dumps({"step": step, **values}) + "\n"
    if self._remote:
      self._lines.append(line)
      if time.monotonic() - self._flushed > self.REMOTE_FLUSH_SECONDS:
        self.flush()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    print(f"step {step}: {text}", flush=True)

  def flush(self) -> None:
    """Every record so far is in metrics.jsonl (on a bucket too)."""
    if self._enabled and self._remote:
      storage.write(self._path, "".join(self._lines))
      self._flushed = time.monotonic()

  def image(self, step: int, name: str, path: str) -> None:
    if self._enabled:
      import matplotlib.image
      with storage.path(path).open("rb") as f:
        picture = matplotlib.image.imread(f, format="png")
      self._tb.add_image(name, picture[..., :3], step, dataformats="HWC")

  def close(self) -> None:
    if self._enabled:
      self.flush()
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl record; None for a line cut short by a kill."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class StepTimes:
  """Where the host's time goes between two logged steps, per step: waiting for the next
  batch (`data_wait_seconds`, reading and placing it on the devices), waiting for the devices
  (`device_wait_seconds`: the host runs one step ahead and waits for the previous step's
  results), checkpointing (`checkpoint_seconds`); `step_seconds` is the whole (the rest is
  dispatch and logging). With throughput, TFLOP/s of the analytic count and MFU against
  `peak_flops` (avmae.flops' table; none where the device kind has no figure)."""

  def __init__(self, start_step: int, peak_flops: float | None, step_flops: float,
               batch_size: int):
    self._peak, self._flops, self._batch = peak_flops, step_flops, batch_size
    self._step, self._start = start_step, time.perf_counter()
    self._sums = {"data": 0.0, "device": 0.0, "checkpoint": 0.0}

  @contextlib.contextmanager
  def timing(self, what: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self._sums[what] += time.perf_counter() - start

  def window(self, step: int) -> dict[str, float]:
    """The figures of the steps since the last window, up to `step`; starts the next."""
    now = time.perf_counter()
    steps, elapsed = max(step - self._step, 1), now - self._start
    out = {"examples_per_second": steps * self._batch / elapsed,
           "tflops_per_second": steps * self._flops / elapsed / 1e12,
           "step_seconds": elapsed / steps,
           **{f"{k}_wait_seconds" if k != "checkpoint" else "checkpoint_seconds": v / steps
              for k, v in self._sums.items()}}
    if self._peak:
      out["mfu"] = steps * self._flops / elapsed / self._peak
    self._step, self._start = step, now
    self._sums = dict.fromkeys(self._sums, 0.0)
    return out


class Profile:
  """A jax.profiler trace of steps first..last (`config.profile_steps`, counted as the logged
  steps; () traces nothing) into `directory` (TensorBoard's profile plugin or XProf read it)."""

  def __init__(self, steps: Sequence[int], directory: str):
    self._steps, self._directory, self._on = tuple(steps), directory, False

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(self._directory)
      self._on = True

  def after(self, step: int, state: Any) -> None:
    if self._on and step == self._steps[1]:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._on:
      jax.profiler.stop_trace()
      self._on = False
