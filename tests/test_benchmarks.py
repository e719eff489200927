"""Every benchmark the README lists runs exactly as documented (`python experiments/...`), in a
quick mode: a renamed flag, a shadowed import or a broken table fails here, not for a user."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quick flags of each benchmark, and a piece of the table its output must contain.
QUICK = {
    "input_pipeline": (["--quick", "--work_dir={tmp}"], "examples/s"),
    "data_prep_speed": (["--quick", "--work_dir={tmp}"], "clips/s/core"),
    "probe": (["--examples=256", "--grid=2", "--steps=20", "--batches=1"], "vmapped sweep"),
    "train_step": (["--sizes=tiny", "--steps=1", "--remat=none", "--time_batch=tiny:4",
                    "--memory_batches=tiny:4:8", "--matmul=256"], "per added example"),
    "pod_fit": (["--sizes=tiny", "--topologies=v5e-4", "--slices=1", "--remat=none",
                 "--out={tmp}/rows.jsonl"], "| tiny | v5e-4 | 1 | none | 48 |"),
    "scan_compile": (["--depths=1,2", "--targets=local", "--size=tiny", "--batch=8"],
                     "| local | 2 |"),
    "vs_torch": (["--sizes=tiny", "--batch=tiny:8", "--rounds=1", "--steps=1", "--matmul=256",
                  "--scan_layers=True", "--profile"], "top torch ops"),
}


def documented() -> list[str]:
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"`python experiments/benchmarks/(\w+)\.py", section)


def test_every_benchmark_is_documented_and_has_a_quick_mode():
  scripts = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "benchmarks"))
                   if f.endswith(".py") and not f.startswith("_"))
  assert sorted(documented()) == scripts
  assert sorted(QUICK) == scripts


@pytest.mark.parametrize("name", sorted(QUICK))
def test_benchmark_runs_as_documented(name, tmp_path):
  flags, expected = QUICK[name]
  command = [sys.executable, f"experiments/benchmarks/{name}.py",
             *(f.format(tmp=tmp_path) for f in flags)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ""}
  p = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert expected in p.stdout, p.stdout[-3000:]
  if name == "vs_torch":  # same weights, masks and objective: the same first loss
    jax_loss, torch_loss = re.search(r"\| tiny \| 8 \| float32 \| True \| ([\d.]+) / ([\d.]+) \|",
                                     p.stdout).groups()
    assert abs(float(jax_loss) - float(torch_loss)) < 1e-4
