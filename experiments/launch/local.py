"""Train with N processes on this machine, as the hosts of a pod would (jax.distributed over
localhost), for multi-process tests and debugging:

    python experiments/launch/local.py --num_processes=2 [--cpu_devices=4] [--port=P]
        --config=configs/cav_mae.py:tiny --workdir=DIR [--env=KEY=VALUE] [--python=PY]
        [--dry_run] [-- --config.KEY=VALUE ...]

Each line of process i's output is printed as `[i] line`. It waits for all of them and exits
1 if any failed; once one has failed the others are stopped, since they would wait for it in
a collective. From Python: `launch(train_args, num_processes, ...)` starts them and
`wait(processes)` streams their output and returns their exit codes.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

if __package__ in (None, ""):  # run as a script: the repository root, for experiments.launch
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.launch import common  # noqa: E402
from experiments.launch.common import Plan, Run  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def commands(train_args: Sequence[str], num_processes: int, *, port: int,
             cpu_devices: int | None = None, env: Mapping[str, str] | None = None,
             python: str = sys.executable) -> Plan:
  """One trainer command per process, with the explicit coordinator flags (nothing here for
  jax.distributed to detect). cpu_devices: each process runs on that many CPU devices."""
  common.require_positive("--num_processes", num_processes)
  cpu = {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(cpu_devices)} if cpu_devices else {}
  env = {**(env or {}), **cpu}
  return [Run(common.train_command(
      [*train_args, f"--coordinator=localhost:{port}", f"--num_processes={num_processes}",
       f"--process_id={i}"], python), env or None) for i in range(num_processes)]


def start(plan: Plan, cwd: str | None = None) -> list[subprocess.Popen]:
  return [subprocess.Popen(r.argv, cwd=cwd, env={**os.environ, **(r.env or {})},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for r in plan]


def launch(train_args: Sequence[str], num_processes: int, *, port: int | None = None,
           cpu_devices: int | None = None, env: Mapping[str, str] | None = None,
           python: str = sys.executable, cwd: str | None = None) -> list[subprocess.Popen]:
  """Starts `python -m avmae.train *train_args` as num_processes processes of one run (a
  free port when none is given); their output is piped (read it with `wait`)."""
  return start(commands(train_args, num_processes, port=port or free_port(),
                        cpu_devices=cpu_devices, env=env, python=python), cwd)


def wait(processes: Sequence[subprocess.Popen], out: TextIO | None = None,
         grace_s: float = 30.0) -> list[int]:
  """Streams each process's output as `[i] line` (to sys.stdout by default) and returns the
  exit codes. Once one fails, the rest get SIGTERM, and SIGKILL grace_s later."""
  out = out or sys.stdout
  lock = threading.Lock()

  def pump(i: int, p: subprocess.Popen) -> None:
    for line in p.stdout:
      with lock:
        out.write(f"[{i}] {line.rstrip(chr(10))}\n")
        out.flush()

  pumps = [threading.Thread(target=pump, args=(i, p), daemon=True)
           for i, p in enumerate(processes)]
  for t in pumps:
    t.start()
  kill_at = None
  while any(p.poll() is None for p in processes):
    if kill_at is None and any(p.returncode for p in processes):
      for p in processes:
        if p.poll() is None:
          p.terminate()
      kill_at = time.monotonic() + grace_s
    if kill_at is not None and time.monotonic() > kill_at:
      for p in processes:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  for t in pumps:
    t.join()
  return [p.returncode for p in processes]


def build(a: argparse.Namespace) -> Plan:
  return commands(common.train_args(a.config, a.workdir, a.overrides), a.num_processes,
                  port=a.port or free_port(), cpu_devices=a.cpu_devices, env=a.env,
                  python=a.python)


def carry_out(plan: Plan, dry_run: bool) -> int:
  if dry_run:
    return common.execute(plan, dry_run=True)
  codes = wait(start(plan))
  if any(codes):
    print(f"exit codes by process: {codes}", file=sys.stderr)
  return int(any(codes))


def parser() -> argparse.ArgumentParser:
  p = common.parser(__doc__)
  p.add_argument("--num_processes", type=int, required=True, help="Processes of the run.")
  p.add_argument("--cpu_devices", type=int,
                 help="Run each process on this many CPU devices (JAX_PLATFORMS=cpu, "
                      "JAX_NUM_CPU_DEVICES).")
  p.add_argument("--port", type=int, help="The coordinator's port (default: a free one).")
  common.add_train_flags(p, "Checkpoints, metrics, pictures.", python=sys.executable)
  common.add_common_flags(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return common.main(parser(), build, argv, carry_out)


if __name__ == "__main__":
  sys.exit(main())
