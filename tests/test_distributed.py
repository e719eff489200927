"""Multi-host faults with real jax.distributed processes on localhost (2 processes x 4 CPU
devices): preemption of one process, a process that dies, restoring onto another process count
and mesh. Losses are compared with one process x 8 devices to rtol 1e-5, the tolerance of
test_train.py::test_two_processes_train_like_one: cross-process all-reduces sum in another
order than one process does (about 1e-7 relative in the losses after a few steps)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from avmae import checkpoint, train
from test_train import REPO, _args, _metrics, synthetic_dir, tiny  # noqa: F401 (fixture)

REFERENCE_STEPS = 12  # all within the 20 warmup steps: the learning rate ignores total_steps


@pytest.fixture(scope="module")
def reference(synthetic_dir, tmp_path_factory):
  """Losses of one process x 8 devices, steps 1..REFERENCE_STEPS."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train(tiny(synthetic_dir, total_steps=REFERENCE_STEPS,
                   mesh={"data": 8, "fsdp": 1, "tensor": 1}), workdir)
  return [m["loss"] for m in _metrics(workdir)]


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left():
  """A failed test (a hang) leaves no training process behind."""
  yield
  while _STARTED:
    p = _STARTED.pop()
    if p.poll() is None:
      p.kill()
      p.wait()


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(args, workdir, log, env_extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **env_extra}
  cmd = [sys.executable, "-m", "avmae.train", "--config=configs/cav_mae.py:tiny",
         f"--workdir={workdir}", *args]
  with open(log, "w") as out:  # files, not pipes: a full pipe would stall a process
    _STARTED.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                     stderr=subprocess.STDOUT))
  return _STARTED[-1]


def _two(args, workdir, tmp_path, name, slurm=False):
  """Two processes of 4 CPU devices. slurm: `--distributed`, the cluster detected from SLURM's
  variables (as under srun); otherwise --coordinator/--num_processes/--process_id."""
  port, procs = _port(), []
  for i in range(2):
    env = {"JAX_NUM_CPU_DEVICES": "4"}
    if slurm:
      env.update(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                 SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                 JAX_COORDINATOR_ADDRESS=f"localhost:{port}")
      flags = ["--distributed"]
    else:
      flags = ["--num_processes=2", f"--process_id={i}", f"--coordinator=localhost:{port}"]
    procs.append(_start(args + flags, workdir, tmp_path / f"{name}.{i}.log", env))
  return procs, [tmp_path / f"{name}.{i}.log" for i in range(2)]


def _one(args, workdir, tmp_path, name):
  """One process of 8 CPU devices."""
  log = tmp_path / f"{name}.log"
  return _start(args, workdir, log, {"JAX_NUM_CPU_DEVICES": "8"}), log


def _wait(procs, logs, timeout):
  for p in procs:
    p.wait(timeout=timeout)
  outs = [open(log).read() for log in logs]
  assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outs)
  return outs


def _wait_for_line(log, prefix, proc, timeout=600):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(line.startswith(prefix) for line in open(log)):
      return
    assert proc.poll() is None, open(log).read()[-3000:]
    time.sleep(0.2)
  raise TimeoutError(f"no {prefix!r} in {log}")


def _losses(workdir):
  records = _metrics(workdir)
  assert [m["step"] for m in records] == list(range(1, len(records) + 1))  # each step once
  return [m["loss"] for m in records]


def _compare(what, losses, reference):
  worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
  print(f"{what}: losses {np.round(losses, 6).tolist()}, largest relative difference from "
        f"one uninterrupted process {worst:.1e}")
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


@pytest.mark.slow  # one process's SIGTERM save is in test_train
def test_sigterm_to_one_process_saves_the_same_step_on_every_process(synthetic_dir, reference,
                                                                     tmp_path):
  """Preemption reaches one process (SIGTERM to process 1 alone): through the coordination
  service's preemption sync point both processes save the same step and exit 0; resumed on 2
  processes the run gives the uninterrupted losses."""
  workdir = tmp_path / "w"
  args = _args(synthetic_dir, **{"mesh.data": 8})
  procs, logs = _two(args + ["--config.total_steps=100000"], workdir, tmp_path, "first",
                     slurm=True)
  _wait_for_line(logs[0], "step 2:", procs[0])
  procs[1].send_signal(signal.SIGTERM)
  start = time.monotonic()
  outs = _wait(procs, logs, timeout=120)
  seconds = time.monotonic() - start
  saved = [int(re.search(r"preempted: saved step (\d+), exiting", o).group(1)) for o in outs]
  print(f"SIGTERM to process 1: both exited 0 after {seconds:.1f} s, saved steps {saved}")
  assert saved[0] == saved[1] >= 2
  assert seconds < 60
  mngr = checkpoint.manager(str(workdir), 3)
  assert mngr.latest_step() == saved[0]
  mngr.close()
  last = saved[0] + 2
  assert last <= REFERENCE_STEPS
  procs, logs = _two(args + [f"--config.total_steps={last}"], workdir, tmp_path, "resumed")
  outs = _wait(procs, logs, timeout=600)
  assert f"resumed from step {saved[0]}" in outs[0]
  _compare("preempted, resumed on 2 processes", _losses(workdir), reference[:last])


GLOO_TRUNCATED = "Received data size doesn't match expected size"


def test_a_killed_process_stops_the_other_with_a_clear_error(synthetic_dir, tmp_path):
  """SIGKILL to process 1 mid-run: process 0 must not wait for it forever; the coordination
  service misses process 1's heartbeats (config.distributed.heartbeat_timeout_seconds, 5 here)
  and process 0 terminates naming the cause."""
  args = _args(synthetic_dir, total_steps=100000, **{
      "mesh.data": 8, "distributed.heartbeat_timeout_seconds": 5})
  procs, logs = _two(args, tmp_path / "w", tmp_path, "killed")
  _wait_for_line(logs[0], "step 2:", procs[0])
  procs[1].kill()
  start = time.monotonic()
  procs[0].wait(timeout=120)
  seconds = time.monotonic() - start
  out = open(logs[0]).read()
  print(f"SIGKILL to process 1: process 0 exited {procs[0].returncode} after {seconds:.1f} s")
  assert procs[0].returncode != 0 and seconds < 30
  # Three ways process 0 learns of it, each seen here: the service's heartbeat check stops it
  # first; or gloo (the CPU collectives) fails the pending all-gather ("Connection reset by
  # peer"), Python exits, and the shutdown barrier fails on the heartbeat timeout: the same
  # message; or, when the kill lands while process 1 is sending, gloo aborts process 0 from
  # its own thread on the truncated message before Python can say anything (seen once, in a
  # CI run; avmae/distributed.py says what that message means). TPU collectives do not fail
  # fast, so there the heartbeat is what ends the wait.
  if GLOO_TRUNCATED in out:  # gloo's exception in its own thread: std::terminate, abort()
    assert procs[0].returncode == -signal.SIGABRT, (procs[0].returncode, out[-3000:])
  else:
    assert "This most likely indicates that another task died" in out, out[-3000:]
    assert re.search(r"stopped sending heartbeats|Task 1 heartbeat timeout", out), out[-3000:]


def test_restore_onto_another_process_count_and_mesh(synthetic_dir, reference, tmp_path):
  """2 processes (mesh data 2 x fsdp 2 x tensor 2) -> checkpoint at step 2 -> 1 process x 8
  devices (data 8) to step 4 -> 2 processes (data 4 x fsdp 2) to step 6: the losses of one
  uninterrupted run, and every step logged once."""
  workdir = tmp_path / "w"
  mesh = lambda d, f, t: {"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t}
  procs, logs = _two(_args(synthetic_dir, total_steps=2, **mesh(2, 2, 2)), workdir, tmp_path,
                     "two")
  _wait(procs, logs, timeout=600)
  proc, log = _one(_args(synthetic_dir, total_steps=4, **mesh(8, 1, 1)), workdir, tmp_path,
                   "one")
  out = _wait([proc], [log], timeout=600)[0]
  assert "resumed from step 2" in out
  _compare("2 -> 1 process", _losses(workdir), reference[:4])
  procs, logs = _two(_args(synthetic_dir, total_steps=6, **mesh(4, 2, 1)), workdir, tmp_path,
                     "two_again")
  outs = _wait(procs, logs, timeout=600)
  assert "resumed from step 4" in outs[0]
  _compare("2 -> 1 -> 2 processes", _losses(workdir), reference[:6])
