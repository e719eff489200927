"""Train on a SLURM GPU cluster: writes an sbatch script that starts one trainer process per
node (each driving all of its node's GPUs) and submits it.

    python experiments/launch/slurm.py --nodes=N [--gpus_per_node=8]
        --config=configs/cav_mae.py:base --workdir=/shared/run [--partition=P] [--account=A]
        [--time=HH:MM:SS] [--cpus_per_task=C] [--job_name=avmae] [--output=%x-%j.log] [--chdir=DIR]
        [--setup='source .venv/bin/activate' ...] [--python=python] [--env=KEY=VALUE]
        [--script=avmae.sbatch] [--dry_run] [-- --config.KEY=VALUE ...]

--dry_run prints the script and the sbatch command; without it the script is written and
submitted. The workdir must be on a filesystem every node mounts (or gs://): a resubmitted
job resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: the repository root, for experiments.launch
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.launch import common  # noqa: E402
from experiments.launch.common import Plan, Run, Write  # noqa: E402

# Before the time limit, SLURM sends SIGTERM to the job's tasks this many seconds early: the
# trainer saves a checkpoint and exits.
TERM_SECONDS = 120


def script(a: argparse.Namespace) -> str:
  common.require_positive("--nodes", a.nodes)
  common.require_positive("--gpus_per_node", a.gpus_per_node)
  directives = {"job-name": a.job_name, "nodes": a.nodes, "ntasks-per-node": 1,
                "gpus-per-node": a.gpus_per_node, "cpus-per-task": a.cpus_per_task,
                "partition": a.partition, "account": a.account, "time": a.time,
                "signal": f"TERM@{TERM_SECONDS}" if a.time else None,
                "output": a.output, "chdir": a.chdir}
  # jax.distributed.initialize() reads SLURM's coordinator, task count and rank, and would
  # give each task only GPU $SLURM_LOCALID (one task per GPU); with one task per node,
  # JAX_LOCAL_DEVICE_IDS hands it all of its node's GPUs.
  env = {"JAX_LOCAL_DEVICE_IDS": ",".join(map(str, range(a.gpus_per_node))), **a.env}
  train = common.train_command(common.train_args(a.config, a.workdir, a.overrides,
                                                 distributed=True), a.python)
  return "\n".join([
      "#!/bin/bash",
      *(f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None),
      "set -eo pipefail",  # not -u: some environments' activate scripts read unset variables
      *a.setup,
      *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
      # A task that fails ends the others (they would wait in a collective until timeout).
      "srun --kill-on-bad-exit=1 " + common.shell(train),
  ]) + "\n"


def build(a: argparse.Namespace) -> Plan:
  return [Write(a.script, script(a)), Run(["sbatch", a.script])]


def parser() -> argparse.ArgumentParser:
  p = common.parser(__doc__)
  p.add_argument("--nodes", type=int, required=True, help="GPU hosts; one process on each.")
  p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs of each host.")
  p.add_argument("--cpus_per_task", type=int, help="CPU cores for each host's process.")
  p.add_argument("--partition", help="SLURM partition.")
  p.add_argument("--account", help="SLURM account.")
  p.add_argument("--time", help=f"Time limit, HH:MM:SS (SIGTERM {TERM_SECONDS} s before it).")
  p.add_argument("--job_name", default="avmae", help="SLURM job name.")
  p.add_argument("--output", default="%x-%j.log", help="Log file of the job (sbatch --output).")
  p.add_argument("--chdir", default=common.REPO,
                 help="The repository on the shared filesystem (default: this one).")
  p.add_argument("--setup", action="append", default=[], metavar="LINE",
                 help="A shell line before srun, e.g. 'source .venv/bin/activate' (repeatable).")
  p.add_argument("--script", default="avmae.sbatch", help="Where the script is written.")
  common.add_train_flags(p, "Checkpoints, metrics: on a shared filesystem or gs://.",
                         python="python")
  common.add_common_flags(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return common.main(parser(), build, argv)


if __name__ == "__main__":
  sys.exit(main())
