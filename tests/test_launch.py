"""Launchers (experiments/launch): the dry runs of each against golden files, flag errors that
name the flag, the commands carried out as printed (fake gcloud, xpk and sbatch), the shell
quoting round trip, SLURM's device visibility, and real two-process runs: the local launcher's,
and the sbatch script's command under the variables SLURM gives each task."""

import io
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "launch"
sys.path.insert(0, str(REPO))  # experiments.launch, as `python -m pytest` from the root has it

from experiments.launch import common, local, slurm, tpu_vm, xpk  # noqa: E402
from data_prep import make_synthetic  # noqa: E402

LAUNCHERS = {"tpu_vm": tpu_vm, "xpk": xpk, "slurm": slurm, "local": local}
VM = ["--name=avmae-v5e", "--zone=us-west4-a", "--project=my-project"]
QR = ["--name=avmae-2x", "--zone=us-east5-b", "--queued_resource"]
TRAIN = ["--config=configs/cav_mae.py:base", "--workdir=gs://my-bucket/runs/base"]
OVERRIDES = ["--", "--config.data.dir=/mnt/data/audioset", "--config.total_steps=100000"]
# Each golden file: the dry runs of a sequence of invocations of one launcher.
SCENARIOS = {
    "tpu_vm": ("tpu_vm", [
        ["create", *VM, "--accelerator_type=v5litepod-256"],
        ["install", *VM, "--gcsfuse_bucket=gs://my-data"],
        ["launch", *VM, *TRAIN, "--env=TPU_STDERR_LOG_LEVEL=0", *OVERRIDES],
        ["logs", *VM, "--worker=3"],
        ["stop", *VM],
        ["delete", *VM]]),
    "tpu_vm_multislice": ("tpu_vm", [
        ["create", *QR, "--accelerator_type=v6e-256", "--num_slices=2", "--capacity=spot"],
        ["status", *QR],
        ["install", *QR],
        ["launch", *QR, *TRAIN, *OVERRIDES, "--config.data.batch_size=1024"],
        ["logs", *QR, "--node=1"],
        ["stop", *QR],
        ["delete", *QR]]),
    "xpk": ("xpk", [
        ["create", "--cluster=v5e-cluster", "--workload=avmae-base", "--tpu_type=v5e-256",
         "--docker_image=gcr.io/my-project/avmae:latest", *TRAIN, "--max_restarts=3", *OVERRIDES],
        ["list", "--cluster=v5e-cluster"],
        ["delete", "--cluster=v5e-cluster", "--workload=avmae-base"]]),
    "xpk_multislice": ("xpk", [
        ["create", "--cluster=v5e-cluster", "--workload=avmae-2x", "--tpu_type=v5litepod-256",
         "--num_slices=4", "--docker_image=gcr.io/my-project/avmae:latest", *TRAIN,
         "--project=my-project", "--zone=us-west4-a", "--env=XLA_FLAGS=--xla_dump_to=/tmp/x",
         "--priority=high", *OVERRIDES, "--config.data.batch_size=4096"]]),
    "slurm": ("slurm", [
        ["--nodes=4", "--gpus_per_node=8", "--partition=a100", "--time=48:00:00",
         "--chdir=/shared/avmae", "--setup=source /shared/avmae/.venv/bin/activate",
         "--config=configs/cav_mae.py:base", "--workdir=/shared/runs/base",
         "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--script=/shared/avmae/base.sbatch",
         *OVERRIDES, "--config.name=it's base"]]),
    "local": ("local", [
        ["--num_processes=2", "--cpu_devices=4", "--port=12345", "--python=python",
         "--config=configs/cav_mae.py:tiny", "--workdir=/tmp/run", *OVERRIDES]]),
}


def with_dry_run(argv: list[str]) -> list[str]:
  """--dry_run among the launcher's flags, before the trainer's overrides."""
  cut = argv.index("--") if "--" in argv else len(argv)
  return [*argv[:cut], "--dry_run", *argv[cut:]]


def dry_run(launcher: str, argv: list[str], capsys) -> str:
  assert LAUNCHERS[launcher].main(with_dry_run(argv)) == 0
  return capsys.readouterr().out


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_dry_run_matches_golden_file(scenario, capsys):
  launcher, invocations = SCENARIOS[scenario]
  text = "".join(f"# python experiments/launch/{launcher}.py {shlex.join(with_dry_run(argv))}\n"
                 + dry_run(launcher, argv, capsys) + "\n" for argv in invocations)
  text = text.replace(common.REPO, "<repo>")  # the git archive's source
  golden = GOLDEN / f"{scenario}.txt"
  if os.environ.get("AVMAE_UPDATE_GOLDEN"):
    golden.parent.mkdir(parents=True, exist_ok=True)
    golden.write_text(text)
  assert text == golden.read_text(), "set AVMAE_UPDATE_GOLDEN=1 to regenerate deliberately"


@pytest.mark.parametrize("launcher,argv,expected", [
    ("tpu_vm", ["create", *VM, "--accelerator_type=v9-8"],
     ["--accelerator_type='v9-8'", "known:", "v5litepod-256", "v4-32", "v5p-128", "v6e-256"]),
    ("xpk", ["create", "--cluster=c", "--workload=w", "--tpu_type=v5e-3", "--docker_image=i",
             *TRAIN], ["--tpu_type='v5e-3'", "known:", "v5litepod-256"]),
    ("tpu_vm", ["create", *VM, "--accelerator_type=v4-32", "--num_slices=2"],
     ["--num_slices=2", "--queued_resource"]),
    ("tpu_vm", ["create", *VM, "--accelerator_type=v4-32", "--capacity=best_effort"],
     ["--capacity=best_effort", "--queued_resource"]),
    ("tpu_vm", ["create", *VM, "--accelerator_type=v4-32", "--capacity=cheap"],
     ["--capacity", "invalid choice", "'spot'"]),
    ("tpu_vm", ["launch", *VM, "--config=c", "--workdir=/tmp/run"],
     ["--workdir='/tmp/run'", "gs://"]),
    ("xpk", ["create", "--cluster=c", "--workload=w", "--tpu_type=v4-8", "--docker_image=i",
             "--config=c", "--workdir=runs/x"], ["--workdir='runs/x'", "gs://"]),
    ("tpu_vm", ["launch", *VM, *TRAIN, "--", "--total_steps=3"], ["after --", "--total_steps=3"]),
    ("tpu_vm", ["delete", *VM, "--", "--config.total_steps=3"], ["after --", "launch"]),
    ("tpu_vm", ["launch", *VM, *TRAIN, "--env=1X=2"], ["--env", "'1X=2'"]),
    ("tpu_vm", ["install", *VM, "--gcsfuse_bucket=gs://My_Bucket"], ["--gcsfuse_bucket"]),
    ("tpu_vm", ["launch", *VM], ["--config", "--workdir", "required"]),
    ("slurm", ["--nodes=0", "--config=c", "--workdir=w"], ["--nodes=0"]),
    ("slurm", ["--nodes=2", "--gpus_per_node=0", "--config=c", "--workdir=w"],
     ["--gpus_per_node=0"]),
    ("local", ["--num_processes=0", "--config=c", "--workdir=w"], ["--num_processes=0"]),
    ("xpk", ["create", "--cluster=c", "--workload=w", "--tpu_type=v4-8", "--docker_image=i",
             *TRAIN, "--num_slices=0"], ["--num_slices=0"]),
])
def test_bad_flags_exit_2_naming_the_flag(launcher, argv, expected, capsys):
  with pytest.raises(SystemExit) as e:
    LAUNCHERS[launcher].main(with_dry_run(argv))
  err = capsys.readouterr().err
  assert e.value.code == 2
  for text in expected:
    assert text in err, err


@pytest.mark.parametrize("launcher,argv", [("tpu_vm", ["launch", "--help"]),
                                           ("xpk", ["create", "--help"]),
                                           ("slurm", ["--help"]), ("local", ["--help"])])
def test_runs_as_a_script_and_help_lists_the_flags(launcher, argv):
  p = subprocess.run([sys.executable, f"experiments/launch/{launcher}.py", *argv], cwd=REPO,
                     env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr
  for flag in ("--config", "--workdir", "--env", "--dry_run"):
    assert flag in p.stdout


def test_quoting_survives_the_remote_shell(capsys):
  """The printed command parses back into gcloud's argv; its --command, parsed as the worker's
  shell will, holds the trainer's argv with the awkward values intact."""
  overrides = ["--config.name=it's a \"run\"", "--config.data.dir=/mnt/my data"]
  line = dry_run("tpu_vm", ["launch", *VM, *TRAIN, "--env=NOTE=a b", "--", *overrides], capsys)
  argv = shlex.split(line.removeprefix("$ "))
  remote = shlex.split(argv[argv.index("--command") + 1])
  start = remote.index("nohup") + 1
  expected = ["env", "NOTE=a b", *common.train_command(
      common.train_args(TRAIN[0][9:], TRAIN[1][10:], overrides, distributed=True))]
  assert remote[start:remote.index(">", start)] == expected


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
  """gcloud, xpk and sbatch on PATH that record their argv (one JSON list a line)."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
  bin_dir.mkdir()
  for tool in ("gcloud", "xpk", "sbatch"):
    record = f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    (bin_dir / tool).write_text(f"#!{sys.executable}\nimport json, sys\n{record}")
    (bin_dir / tool).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return lambda: [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("launcher,argv", [
    ("tpu_vm", ["launch", *QR, *TRAIN, *OVERRIDES]),
    ("tpu_vm", ["delete", *VM]),
    ("xpk", SCENARIOS["xpk_multislice"][1][0])])
def test_runs_exactly_what_the_dry_run_prints(launcher, argv, fake_tools, capsys):
  printed = dry_run(launcher, argv, capsys)
  assert fake_tools() == []  # the dry run ran nothing
  assert LAUNCHERS[launcher].main(argv) == 0
  assert capsys.readouterr().out == printed  # each command is echoed as it runs
  assert fake_tools() == [shlex.split(l.removeprefix("$ "))[1:] for l in printed.splitlines()]


def test_slurm_writes_the_script_it_prints_and_submits_it(tmp_path, fake_tools, capsys):
  script = tmp_path / "job.sbatch"
  argv = ["--nodes=2", "--config=configs/cav_mae.py:base", f"--workdir={tmp_path}/run",
          f"--script={script}", *OVERRIDES]
  printed = dry_run("slurm", argv, capsys)
  assert not script.exists() and fake_tools() == []
  assert slurm.main(argv) == 0
  body = printed.split(f"--- write {script} ---\n", 1)[1].split(f"--- end of {script} ---")[0]
  assert script.read_text() == body
  assert fake_tools() == [[str(script)]]


@pytest.mark.parametrize("device_ids,visible", [(None, "0"), ("0,1,2,3", "0,1,2,3")])
def test_slurm_one_task_per_node_sees_every_gpu_only_with_local_device_ids(device_ids, visible):
  """What the sbatch script's JAX_LOCAL_DEVICE_IDS is for: under SLURM, jax.distributed's
  auto-detection leaves a task only GPU $SLURM_LOCALID unless it is set (SLURM's variables of
  one task on this host; GPU visibility is a setting, readable on a CPU)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "1",
         "SLURM_STEP_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "JAX_COORDINATOR_PORT": str(local.free_port())}
  env.pop("JAX_LOCAL_DEVICE_IDS", None)
  env.update({"JAX_LOCAL_DEVICE_IDS": device_ids} if device_ids else {})
  code = ("import jax; jax.distributed.initialize(); "
          "print(jax.process_count(), jax.config.read('jax_cuda_visible_devices'))")
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split() == ["1", visible]


def test_wait_stops_the_others_when_one_fails():
  procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for code in ("print('bye'); raise SystemExit(3)", "import time; time.sleep(600)")]
  out = io.StringIO()
  codes = local.wait(procs, out=out, grace_s=10)
  assert codes[0] == 3 and codes[1] != 0  # SIGTERM, not the 600 s of its sleep
  assert "[0] bye\n" in out.getvalue()


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  make_synthetic.make_synthetic(out, num_train=64, num_eval=16, num_shards=2)
  return out


def tiny_overrides(data: str, steps: int) -> list[str]:
  return [f"--config.data.dir={data}", "--config.data.batch_size=16",
          f"--config.total_steps={steps}", "--config.log_every_steps=1",
          "--config.image_every_steps=1000", "--config.checkpoint_every_steps=1000",
          "--config.mesh.data=8"]


def test_local_launcher_trains_with_two_processes(synthetic_dir, tmp_path):
  """A real run: 2 processes x 4 CPU devices, 3 steps of the tiny config, through launch()
  and wait(); process 0 writes the metrics and both write the checkpoint."""
  workdir = tmp_path / "run"
  args = common.train_args("configs/cav_mae.py:tiny", str(workdir),
                           tiny_overrides(synthetic_dir, 3))
  out = io.StringIO()
  codes = local.wait(local.launch(args, 2, cpu_devices=4, cwd=str(REPO)), out=out)
  lines = out.getvalue().splitlines()
  assert codes == [0, 0], "\n".join(lines[-60:])
  assert {l[:4] for l in lines} == {"[0] ", "[1] "}
  metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [1, 2, 3]
  assert (workdir / "checkpoints" / "3").is_dir()


@pytest.mark.slow  # launched processes train in test_local_launcher_trains_with_two_processes
def test_slurm_script_trains_under_slurm_variables(synthetic_dir, tmp_path):
  """The sbatch script's environment and srun command, run as srun would on 2 nodes (here 2
  processes x 4 CPU devices with the variables SLURM gives each task): `--distributed` finds
  the other process through jax's SLURM detection, and the 2 steps train as one run."""
  workdir = tmp_path / "run"
  args = common.parse(slurm.parser(), [
      "--nodes=2", "--config=configs/cav_mae.py:tiny", f"--workdir={workdir}",
      f"--python={sys.executable}", "--", *tiny_overrides(synthetic_dir, 2)])
  lines = slurm.script(args).splitlines()
  exports = dict(shlex.split(l.removeprefix("export "))[0].split("=", 1)
                 for l in lines if l.startswith("export "))
  srun = shlex.split(next(l for l in lines if l.startswith("srun ")))
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and "--distributed" in srun
  slurm_env = {"SLURM_JOB_ID": "5", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
               "SLURM_LOCALID": "0", "JAX_COORDINATOR_PORT": str(local.free_port()),
               "JAX_NUM_CPU_DEVICES": "4"}
  plan = [common.Run(srun[2:], {**exports, **slurm_env, "SLURM_PROCID": str(i)})
          for i in range(2)]
  out = io.StringIO()
  codes = local.wait(local.start(plan, cwd=str(REPO)), out=out)
  assert codes == [0, 0], out.getvalue()[-6000:]
  metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [1, 2]
