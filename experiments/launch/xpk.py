"""Train on a GKE cluster with TPU node pools through xpk (`pip install xpk`; the cluster made
with `xpk cluster create`):

    python experiments/launch/xpk.py create --cluster=C --workload=W --tpu_type=v5litepod-256
        [--num_slices=2] --docker_image=IMAGE --config=configs/cav_mae.py:base
        --workdir=gs://BUCKET/run [--max_restarts=N] [--priority=medium] [--env=KEY=VALUE]
        [--project=P] [--zone=Z] [-- --config.KEY=VALUE ...]
    python experiments/launch/xpk.py delete --cluster=C --workload=W [--project=P] [--zone=Z]
    python experiments/launch/xpk.py list --cluster=C [--project=P] [--zone=Z]

The image must hold the repository at its working directory with avmae installed
(`pip install -e .[tpu,gcs]`); xpk runs the trainer in it on every host of every slice, and GKE
sets what jax.distributed.initialize() and the multi-slice runtime read. --max_restarts lets
the JobSet restart after a preemption or a lost node: the trainer resumes from the newest
checkpoint in the workdir. Every subcommand takes --dry_run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: the repository root, for experiments.launch
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.launch import common  # noqa: E402
from experiments.launch.common import Plan, Run  # noqa: E402


def _cluster(a: argparse.Namespace) -> list[str]:
  return ([f"--cluster={a.cluster}"] + ([f"--project={a.project}"] if a.project else [])
          + ([f"--zone={a.zone}"] if a.zone else []))


def create(a: argparse.Namespace) -> Plan:
  tpu_type, _ = common.tpu_accelerator("--tpu_type", a.tpu_type)
  common.require_positive("--num_slices", a.num_slices)
  common.require_gcs("--workdir", a.workdir)
  train = common.train_command(common.train_args(a.config, a.workdir, a.overrides,
                                                 distributed=True), a.python)
  return [Run(["xpk", "workload", "create", *_cluster(a), f"--workload={a.workload}",
               f"--tpu-type={tpu_type}", f"--num-slices={a.num_slices}",
               f"--docker-image={a.docker_image}", "--command", common.shell(train),
               f"--max-restarts={a.max_restarts}", f"--priority={a.priority}",
               *(f"--env={k}={v}" for k, v in a.env.items())])]


def delete(a: argparse.Namespace) -> Plan:
  return [Run(["xpk", "workload", "delete", *_cluster(a), f"--workload={a.workload}"])]


def list_workloads(a: argparse.Namespace) -> Plan:
  return [Run(["xpk", "workload", "list", *_cluster(a)])]


COMMANDS = {"create": (create, "Start the trainer on every host of every slice."),
            "delete": (delete, "Delete the workload."),
            "list": (list_workloads, "List the cluster's workloads.")}


def parser() -> argparse.ArgumentParser:
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument("--cluster", required=True, help="The GKE cluster (xpk cluster create).")
  shared.add_argument("--project", help="Google Cloud project (default: gcloud's).")
  shared.add_argument("--zone", help="The cluster's zone (default: gcloud's).")
  p, cmd = common.subcommands(__doc__, shared, COMMANDS, trainer="create")
  for name in ("create", "delete"):
    cmd[name].add_argument("--workload", required=True, help="The workload's name.")
  c = cmd["create"]
  c.add_argument("--tpu_type", required=True, help="v5litepod-256, v5e-256, v4-32, v6e-256, ...")
  c.add_argument("--num_slices", type=int, default=1, help="Slices (multi-slice over DCN).")
  c.add_argument("--docker_image", required=True,
                 help="An image with the repository at its working directory, installed.")
  c.add_argument("--max_restarts", type=int, default=0,
                 help="JobSet restarts after a preemption or lost node (each resumes).")
  c.add_argument("--priority", default="medium",
                 choices=["very-low", "low", "medium", "high", "very-high"])
  common.add_train_flags(c, "gs://BUCKET/PATH: checkpoints, metrics; a restart resumes from "
                            "its newest checkpoint.", python="python")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return common.main(parser(), common.dispatch(COMMANDS, trainer="create"), argv)


if __name__ == "__main__":
  sys.exit(main())
