"""Train on Cloud TPU VMs with gcloud: create the slice (or queue for one, or for several
slices), install avmae on every worker, start the trainer on all of them, follow its log,
stop it, delete the slice.

    python experiments/launch/tpu_vm.py create --name=N --zone=Z --accelerator_type=v5litepod-256
        [--runtime_version=V] [--capacity=on_demand|reserved|spot|best_effort]
        [--queued_resource [--num_slices=2]]
    python experiments/launch/tpu_vm.py install --name=N --zone=Z [--queued_resource]
        [--gcsfuse_bucket=BUCKET [--mount_point=/mnt/data]] [--python=python3.11]
    python experiments/launch/tpu_vm.py launch --name=N --zone=Z [--queued_resource]
        --config=configs/cav_mae.py:base --workdir=gs://BUCKET/run [--env=KEY=VALUE]
        [-- --config.KEY=VALUE ...]
    python experiments/launch/tpu_vm.py logs|stop|status|delete --name=N --zone=Z
        [--queued_resource]

Every subcommand takes --project and --dry_run (print the commands, run nothing). With
--queued_resource the slices are a queued resource named N (nodes N, or N-0, N-1, ... for
several slices) and every command reaches all nodes; multi-slice needs one. Each slice's
MEGASCALE settings come from the TPU runtime, so the command is the same on every worker.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: the repository root, for experiments.launch
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.launch import common  # noqa: E402
from experiments.launch.common import FlagError, Plan, Run  # noqa: E402

# The TPU software each generation boots (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
CAPACITY = {"on_demand": [], "reserved": ["--reserved"], "spot": ["--spot"],
            "best_effort": ["--best-effort"]}
# On every worker, relative to the home directory where ssh starts.
SOURCE, VENV, LOG, PID = "avmae", "avmae-venv", "avmae-train.log", "avmae-train.pid"


def _where(a: argparse.Namespace) -> list[str]:
  return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def _group(a: argparse.Namespace) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources" if a.queued_resource else "tpu-vm"]


def _everyone(a: argparse.Namespace) -> list[str]:
  """Every worker of every slice."""
  return ["--node=all", "--worker=all"] if a.queued_resource else ["--worker=all"]


def ssh(a: argparse.Namespace, command: str, workers: Sequence[str] | None = None) -> Run:
  return Run([*_group(a), "ssh", a.name, *_where(a), *(workers or _everyone(a)),
              "--command", command])


def create(a: argparse.Namespace) -> Plan:
  accelerator, generation = common.tpu_accelerator("--accelerator_type", a.accelerator_type)
  version = a.runtime_version or RUNTIME_VERSIONS[generation]
  common.require_positive("--num_slices", a.num_slices)
  if not a.queued_resource:
    if a.num_slices != 1:
      raise FlagError(f"--num_slices={a.num_slices}: several slices are one queued resource; "
                      "add --queued_resource")
    if a.capacity == "best_effort":
      raise FlagError("--capacity=best_effort: only queued resources offer it; "
                      "add --queued_resource")
    return [Run([*_group(a), "create", a.name, *_where(a), f"--accelerator-type={accelerator}",
                 f"--version={version}", *CAPACITY[a.capacity]])]
  nodes = ([f"--node-id={a.name}"] if a.num_slices == 1 else
           [f"--node-count={a.num_slices}", f"--node-prefix={a.name}"])
  # --best-effort is in gcloud's alpha track only (GA has --spot in its place).
  track = ["alpha"] if a.capacity == "best_effort" else []
  return [Run(["gcloud", *track, *_group(a)[1:], "create", a.name, *_where(a),
               f"--accelerator-type={accelerator}", f"--runtime-version={version}", *nodes,
               *CAPACITY[a.capacity]])]


def install(a: argparse.Namespace) -> Plan:
  """The committed tree (git archive of HEAD) on every worker, in a virtual environment with
  the `tpu` extra; the TPU images' Python is 3.10, avmae needs 3.11."""
  archive = os.path.basename(a.archive)
  python = shlex.quote(a.python)
  remote = " && ".join([
      f"rm -rf {SOURCE} && mkdir {SOURCE} && tar -xzf {shlex.quote(archive)} -C {SOURCE}",
      f"{{ command -v {python} >/dev/null || {{ sudo apt-get update -q && "
      f"sudo apt-get install -y -q {python} {shlex.quote(a.python + '-venv')}; }}; }}",
      f"{python} -m venv {VENV}",
      f"{VENV}/bin/pip install -q -e \"./{SOURCE}[tpu,gcs]\""])
  plan = [Run(["git", "-C", common.REPO, "archive", "--format=tar.gz", f"--output={a.archive}",
               "HEAD"]),
          Run([*_group(a), "scp", a.archive, f"{a.name}:", *_where(a), *_everyone(a)]),
          ssh(a, remote)]
  return plan + ([ssh(a, gcsfuse_mount(a.gcsfuse_bucket, a.mount_point))]
                 if a.gcsfuse_bucket else [])


def gcsfuse_mount(bucket: str, mount_point: str) -> str:
  """Mounts the dataset bucket read-through at the same path on every worker (as MaxText
  reads its grain data): installs gcsfuse from Google's apt repository where it is missing;
  a worker where it is mounted already is left alone."""
  bucket = bucket.removeprefix("gs://").rstrip("/")
  if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", bucket):
    raise FlagError(f"--gcsfuse_bucket={bucket!r}: not a bucket name (gs://BUCKET or BUCKET)")
  point = shlex.quote(mount_point)
  return " && ".join([
      "{ command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt "
      "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list "
      ">/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
      "sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -y -q fuse "
      "gcsfuse; }; }",
      f"sudo mkdir -p {point} && sudo chown \"$(id -u):$(id -g)\" {point}",
      f"{{ mountpoint -q {point} || gcsfuse --implicit-dirs {bucket} {point}; }}"])


def launch(a: argparse.Namespace) -> Plan:
  """The same trainer command on every worker, in the background under nohup (it outlives
  the ssh session), its output in ~/avmae-train.log and its pid in ~/avmae-train.pid. A
  worker where the trainer still runs refuses: two trainers would share one workdir."""
  common.require_gcs("--workdir", a.workdir)
  train = common.shell(common.train_command(
      common.train_args(a.config, a.workdir, a.overrides, distributed=True)), a.env)
  return [ssh(a, f"if kill -0 \"$(cat {PID} 2>/dev/null)\" 2>/dev/null; then "
                 f"echo \"avmae.train runs here already: stop it first\" >&2; exit 1; fi && "
                 f"cd {SOURCE} && . ../{VENV}/bin/activate && "
                 f"{{ nohup {train} > ../{LOG} 2>&1 < /dev/null & echo $! > ../{PID}; }}")]


def logs(a: argparse.Namespace) -> Plan:
  one = ([f"--node={a.node}"] if a.queued_resource else []) + [f"--worker={a.worker}"]
  return [ssh(a, f"tail -n 200 -F {LOG}", one)]


def stop(a: argparse.Namespace) -> Plan:
  """SIGTERM on every worker: the trainer saves a checkpoint and exits; this waits for it,
  so that a delete after it loses nothing."""
  return [ssh(a, f"pid=\"$(cat {PID} 2>/dev/null)\"; if kill \"$pid\" 2>/dev/null; then "
                 f"while kill -0 \"$pid\" 2>/dev/null; do sleep 2; done; echo stopped; "
                 f"else echo \"avmae.train is not running\"; fi")]


def status(a: argparse.Namespace) -> Plan:
  return [Run([*_group(a), "describe", a.name, *_where(a)])]


def delete(a: argparse.Namespace) -> Plan:
  # --force deletes a queued resource's TPU nodes with it.
  force = ["--force"] if a.queued_resource else []
  return [Run([*_group(a), "delete", a.name, *_where(a), *force, "--quiet"])]


COMMANDS = {
    "create": (create, "Create the TPU VM, or the queued resource."),
    "install": (install, "Copy the committed tree to every worker and pip install it."),
    "launch": (launch, "Start the trainer on every worker (--distributed)."),
    "logs": (logs, "Follow one worker's trainer log."),
    "stop": (stop, "SIGTERM the trainer on every worker (it checkpoints) and wait for it."),
    "status": (status, "Describe the TPU VM or queued resource."),
    "delete": (delete, "Delete the TPU VM, or the queued resource with its nodes."),
}


def parser() -> argparse.ArgumentParser:
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument("--name", required=True, help="TPU VM (or queued resource) name.")
  shared.add_argument("--zone", required=True, help="e.g. us-west4-a.")
  shared.add_argument("--project", help="Google Cloud project (default: gcloud's).")
  shared.add_argument("--queued_resource", action="store_true",
                      help="The slices are a queued resource (needed for --num_slices > 1).")
  p, cmd = common.subcommands(__doc__, shared, COMMANDS, trainer="launch")
  cmd["create"].add_argument("--accelerator_type", required=True,
                             help="v5litepod-256, v5e-256, v4-32, v5p-128, v6e-256, ...")
  cmd["create"].add_argument("--runtime_version",
                             help=f"Default per generation: {RUNTIME_VERSIONS}.")
  cmd["create"].add_argument("--capacity", choices=list(CAPACITY), default="on_demand",
                             help="best_effort: queued resources only.")
  cmd["create"].add_argument("--num_slices", type=int, default=1,
                             help="Slices (multi-slice over DCN; with --queued_resource).")
  cmd["install"].add_argument("--archive", default="/tmp/avmae-src.tar.gz",
                              help="Where the git archive of HEAD is written here.")
  cmd["install"].add_argument("--python", default="python3.11",
                              help="Interpreter of the workers' virtual environment (apt "
                                   "installs it, and its -venv package, where missing).")
  cmd["install"].add_argument("--gcsfuse_bucket",
                              help="Also mount this bucket with gcsfuse on every worker.")
  cmd["install"].add_argument("--mount_point", default="/mnt/data",
                              help="Where --gcsfuse_bucket is mounted.")
  common.add_train_flags(cmd["launch"], "gs://BUCKET/PATH: checkpoints, metrics; a re-launch "
                                        "resumes from its newest checkpoint.")
  cmd["logs"].add_argument("--worker", type=int, default=0, help="Which worker's log.")
  cmd["logs"].add_argument("--node", type=int, default=0,
                           help="Which slice's (with --queued_resource).")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return common.main(parser(), common.dispatch(COMMANDS, trainer="launch"), argv)


if __name__ == "__main__":
  sys.exit(main())
