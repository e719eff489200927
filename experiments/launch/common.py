"""What every launcher shares: the trainer's command line, its environment, TPU names, and the
plan (the commands a launcher runs and the files it writes, in order) that `--dry_run` prints
instead of carrying out.

Commands are argv lists, run without a local shell. Where one travels as a string (a remote
ssh command, xpk's --command, a line of an sbatch script) it is quoted with shlex, so a value
with spaces or quotes arrives at the trainer as one argument.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Mapping, NamedTuple, Sequence, TextIO

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_MODULE = "avmae.train"
# gcloud and xpk name v5e slices "v5litepod-N"; the other generations by their own name.
GCLOUD_TPU_PREFIX = {"v5e": "v5litepod"}
OVERRIDES_HELP = ("Trainer overrides go after `--`, each as --config.KEY=VALUE "
                  "(e.g. `-- --config.total_steps=1000 --config.data.dir=/mnt/data/as2m`).")


class Run(NamedTuple):
  """A command to run here: argv (no shell) and environment variables added to ours."""
  argv: list[str]
  env: dict[str, str] | None = None


class Write(NamedTuple):
  """A file to write here (a script that a later Run submits)."""
  path: str
  text: str


Plan = list[Run | Write]


class FlagError(ValueError):
  """Bad input; the message starts with the flag's name."""


def train_args(config: str, workdir: str, overrides: Sequence[str] = (), *,
               distributed: bool = False) -> list[str]:
  """`avmae.train`'s arguments. `--distributed`: jax.distributed.initialize() finds the
  coordinator, process count and id itself (TPU VM metadata, GKE, SLURM)."""
  return [f"--config={config}", f"--workdir={workdir}",
          *(["--distributed"] if distributed else []), *overrides]


def train_command(args: Sequence[str], python: str = "python") -> list[str]:
  return [python, "-m", TRAIN_MODULE, *args]


def shell(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  """argv as one POSIX shell command; `env K=V` in front, which also works after nohup or srun
  (a bare `K=V cmd` would not)."""
  prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
  return shlex.join([*prefix, *argv])


def render(plan: Plan) -> str:
  """The plan as --dry_run prints it: `$ command` lines, and each file between markers."""
  lines = []
  for step in plan:
    if isinstance(step, Write):
      lines += [f"--- write {step.path} ---", step.text.rstrip("\n"), f"--- end of {step.path} ---"]
    else:
      lines.append("$ " + shell(step.argv, step.env))
  return "\n".join(lines) + "\n"


def execute(plan: Plan, dry_run: bool, out: TextIO | None = None) -> int:
  """Prints the plan (dry run) or carries it out, stopping at the first failed command."""
  out = out or sys.stdout  # looked up now: tests and callers replace sys.stdout
  if dry_run:
    out.write(render(plan))
    return 0
  for step in plan:
    if isinstance(step, Write):
      os.makedirs(os.path.dirname(os.path.abspath(step.path)), exist_ok=True)
      with open(step.path, "w") as f:
        f.write(step.text)
      print(f"wrote {step.path}", file=out, flush=True)
      continue
    print("$ " + shell(step.argv, step.env), file=out, flush=True)
    code = subprocess.run(step.argv, env={**os.environ, **(step.env or {})}).returncode
    if code:
      print(f"exit code {code}: stopped before the rest of the plan", file=sys.stderr)
      return code
  return 0


# ------------------------------------------------------------------------------ flags

def parser(doc: str) -> argparse.ArgumentParser:
  """A launcher's parser: its module docstring (the usage) above the flags."""
  return argparse.ArgumentParser(description=doc, epilog=OVERRIDES_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


Command = Callable[[argparse.Namespace], Plan]


def subcommands(doc: str, shared: argparse.ArgumentParser,
                commands: Mapping[str, tuple[Command, str]], trainer: str
                ) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """A parser with a subcommand per `commands` entry (name: (build, help)), each taking the
  flags of `shared` and --dry_run; `trainer` names the one that takes trainer overrides."""
  add_common_flags(shared)
  p = parser(doc)
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  return p, {name: sub.add_parser(name, parents=[shared], help=text, description=text,
                                  epilog=OVERRIDES_HELP if name == trainer else None)
             for name, (_, text) in commands.items()}


def dispatch(commands: Mapping[str, tuple[Command, str]], trainer: str) -> Command:
  """The plan of the chosen subcommand."""
  def build(args: argparse.Namespace) -> Plan:
    if args.overrides and args.command != trainer:
      raise FlagError(f"after --: trainer overrides go with {trainer}, not {args.command}")
    return commands[args.command][0](args)
  return build


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dry_run", action="store_true",
                      help="Print the commands and files instead of running or writing them.")


def add_train_flags(parser: argparse.ArgumentParser, workdir_help: str,
                    python: str | None = None) -> None:
  """--config, --workdir, --env; --python (default `python`) where the launcher does not set
  up the interpreter itself."""
  parser.add_argument("--config", required=True,
                      help="The trainer's config, relative to the repository root "
                           "(configs/cav_mae.py:base).")
  parser.add_argument("--workdir", required=True, help=workdir_help)
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="An environment variable for the trainer (repeatable).")
  if python:
    parser.add_argument("--python", default=python, help="The trainer's interpreter.")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
  """Launcher flags before `--`, the trainer's --config.KEY=VALUE overrides after it
  (`args.overrides`); `args.env` becomes a dict."""
  argv = list(sys.argv[1:] if argv is None else argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:cut])
  args.overrides = argv[cut + 1:]
  for o in args.overrides:
    if not re.fullmatch(r"--config\.\w[\w.]*=.*", o, re.DOTALL):
      raise FlagError(f"after --: {o!r} is not a trainer override --config.KEY=VALUE")
  if hasattr(args, "env"):
    args.env = parse_env(args.env)
  return args


def main(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], Plan],
         argv: Sequence[str] | None, carry_out: Callable[[Plan, bool], int] = execute) -> int:
  """Parses, builds the plan and prints or carries it out; bad input exits 2 naming the flag."""
  try:
    args = parse(parser, argv)
    plan = build(args)
  except FlagError as e:
    parser.error(str(e))
  return carry_out(plan, args.dry_run)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
  env = {}
  for pair in pairs:
    key, eq, value = pair.partition("=")
    if not (eq and re.fullmatch(r"[A-Za-z_]\w*", key)):
      raise FlagError(f"--env: {pair!r} is not KEY=VALUE")
    env[key] = value
  return env


def require_gcs(flag: str, path: str) -> None:
  if not path.startswith("gs://"):
    raise FlagError(f"{flag}={path!r}: every host of a pod writes and reads the same "
                    "checkpoints, so it must be a bucket path, gs://BUCKET/PATH")


def require_positive(flag: str, value: int) -> None:
  if value < 1:
    raise FlagError(f"{flag}={value}: must be at least 1")


def tpu_accelerator(flag: str, name: str) -> tuple[str, str]:
  """A TPU slice name (v5e-256, v5litepod-256, v4-32, v5p-128, v6e-256) as gcloud and xpk
  spell it, and its generation. Unknown names list the known ones (avmae.aot's)."""
  from avmae import aot  # imports jax: only when a TPU name is checked, not for --help
  try:
    topology = aot.parse_topology(name)
  except ValueError:
    raise FlagError(f"{flag}={name!r}: unknown TPU accelerator type; known: "
                    f"{', '.join(aot.known_topologies())}") from None
  gen = topology.generation
  count = topology.chips * aot.GENERATIONS[gen].cores_per_chip
  return f"{GCLOUD_TPU_PREFIX.get(gen, gen)}-{count}", gen
