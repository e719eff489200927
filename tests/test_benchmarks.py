"""Every benchmark the README lists runs exactly as documented (`python experiments/...`), in a
quick mode: a renamed flag, a shadowed import or a broken table fails here, not for a user."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quick flags of each benchmark, and a piece of the table its output must contain.
QUICK = {
    "input_pipeline": (["--quick", "--work_dir={tmp}"], "examples/s per host core"),
    "data_prep_speed": (["--quick", "--work_dir={tmp}"], "clips/s/core"),
    "probe": (["--examples=256", "--grid=2", "--steps=20", "--batches=1"], "vmapped sweep"),
    # A size of another method's config module too (MODULE:NAME).
    "train_step": (["--sizes=tiny,audio_mae:tiny", "--steps=1", "--remat=none",
                    "--time_batch=tiny:4,audio_mae:tiny:4", "--memory_batches=tiny:4",
                    "--matmul=256"], "audio_mae:tiny  none     4   float32"),
    # A size of another method's config module, at its config's global batch.
    "pod_fit": (["--sizes=av_mae:tiny", "--topologies=v5e-4", "--slices=1", "--remat=none",
                 "--out={tmp}/rows.jsonl"], "| av_mae:tiny | v5e-4 | 1 | none | 32 |"),
    "scan_compile": (["--depths=1", "--targets=local", "--size=tiny", "--batch=8"],
                     "| local | 1 |"),
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


# The three whose quick mode compiles the most run with the slow tests (README: Tests).
SLOW = ("scan_compile", "train_step", "vs_torch")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if n in SLOW else ())
                                  for n in sorted(QUICK)])
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


@pytest.fixture(scope="module")
def pod_fit():
  """The benchmark script as a module (loaded once: it defines absl flags)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "pod_fit", os.path.join(ROOT, "experiments", "benchmarks", "pod_fit.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _affine_hbm_compiler():
  """A stand-in for the compiler with HBM affine in the batch, as the compiles measure it:
  4 GiB of arguments, 3 MiB an example; 16 GiB chips, 8 data shards. The largest batch that
  fits is 4,096 (the largest multiple of 8 under 12 GiB of temporaries). Returns the list of
  compiled batches, `compile_row` and the first (official batch) row."""
  hbm = lambda batch: 4.0 + batch * 3 / 1024
  compiled = []

  def compile_row(batch):
    compiled.append(batch)
    row = {"batch": batch, "fits": hbm(batch) <= 16.0}
    return {**row, "hbm_gib": hbm(batch)} if row["fits"] else {**row, "needed_gib": hbm(batch)}

  first = {"batch": 48, "fits": True, "chips": 8, "hbm_gib": hbm(48), "hbm_limit_gib": 16.0,
           "argument_gib": 4.0, "temporary_gib": 48 * 3 / 1024}
  return compiled, compile_row, first


@pytest.mark.parametrize("start", [None, 2048, 9000])
def test_largest_batch_search_homes_in_on_the_limit(pod_fit, start):
  compiled, compile_row, first = _affine_hbm_compiler()
  found = pod_fit.largest_batch(first, compile_row, start=start)
  assert found["largest"] and found["fits"]
  assert 4096 / 1.1 <= found["batch"] <= 4096, (found["batch"], compiled)
  assert all(b % 8 == 0 for b in compiled)
  assert len(compiled) <= 4, compiled


def test_a_close_hint_takes_two_compiles(pod_fit):
  # A hint of 4,000 (2 slices at twice the one-slice answer) fits within 10 % of the
  # answer of 4,096, and 10 % above it fails: two compiles bracket the limit.
  compiled, compile_row, first = _affine_hbm_compiler()
  found = pod_fit.largest_batch(first, compile_row, start=4000)
  assert (found["batch"], compiled) == (4000, [4000, 4400])


def test_a_resumed_search_goes_on_past_a_hint_it_compiled_before(pod_fit):
  # Killed after compiling the hint of 4,000: resumed with that row known, the search
  # compiles 10 % above it, as the uninterrupted search does, instead of stopping at 4,000.
  compiled, compile_row, first = _affine_hbm_compiler()
  known = [compile_row(4000)]
  found = pod_fit.largest_batch(first, compile_row, known, start=4000)
  assert (found["batch"], compiled) == (4000, [4000, 4400])


def test_a_resumed_search_past_its_hint_goes_on_from_what_fits(pod_fit):
  # Resumed with 3,000 known to fit, a hint of 2,048 (remat none's answer) is below it: the
  # search goes on above 3,000 instead of ending there without a batch that fails.
  compiled, compile_row, first = _affine_hbm_compiler()
  known = [compile_row(3000)]
  found = pod_fit.largest_batch(first, compile_row, known, start=2048)
  assert 4096 / 1.1 <= found["batch"] <= 4096, (found["batch"], compiled)
  assert min(compiled[1:]) > 3000, compiled


def test_the_search_starts_from_answers_already_found(pod_fit):
  done = {("base", "v5e-256", 1, "full", True): {"batch": 3000},
          ("base", "v5e-256", 2, "none", True): {"batch": 5000}}
  assert pod_fit.start_hint(done, "base", "v5e-256", 2, "full") == 6000  # 2 slices: 2x
  assert pod_fit.start_hint(done, "base", "v5e-256", 2, "dots") == 5000  # remat none's
  assert pod_fit.start_hint(done, "base", "v5e-256", 2, "none") is None


def test_a_call_in_a_child_returns_its_result_or_the_signal_that_killed_it(pod_fit,
                                                                          monkeypatch):
  # The child imports the script by name, as it does when the script runs as __main__.
  monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments", "benchmarks"))
  monkeypatch.setitem(sys.modules, "pod_fit", pod_fit)
  assert pod_fit.call_in_child(math.factorial, 5) == (120, None)
  assert pod_fit.call_in_child(os.abort) == (None, "SIGABRT")
  with pytest.raises(RuntimeError, match="exit in a child process exited with code 3"):
    pod_fit.call_in_child(sys.exit, 3)


def test_a_compiler_crash_bounds_the_search_and_the_answer_says_so(pod_fit):
  # The compiler dies on every batch from 3,000 (below the HBM limit's 4,096): the search
  # goes on below the crash, ends within 10 % of it, and does not report 4,096.
  compiled, affine_row, first = _affine_hbm_compiler()
  compile_row = lambda batch: (affine_row(batch) if batch < 3000 else
                               {"batch": batch, "fits": False, "crashed": "SIGSEGV"})
  found = pod_fit.largest_batch(first, compile_row)
  assert found["largest"] and found["fits"]
  assert found["below_crash"] >= 3000 and found["below_crash"] / 1.1 <= found["batch"] < 3000


def test_after_a_crash_the_next_candidate_is_where_the_fitting_batches_line_meets_the_limit(
    pod_fit):
  # A crash gives no HBM figure to interpolate to: the next candidate is where the line of
  # the batches that fit meets 99 % of the limit (4,040 here), not the bracket's middle
  # (4,496), and a crash above the HBM limit (from 6,000; the limit is at 4,096) does not
  # mark the answer.
  compiled, affine_row, first = _affine_hbm_compiler()
  compile_row = lambda batch: (affine_row(batch) if batch < 6000 else
                               {"batch": batch, "fits": False, "crashed": "SIGSEGV"})
  found = pod_fit.largest_batch(first, compile_row, [compile_row(3000), compile_row(6000)])
  assert 4096 / 1.1 <= found["batch"] <= 4096 and "below_crash" not in found
  assert compiled[:2] == [3000, 4040], compiled


def test_the_table_gives_each_largest_batch_and_each_search_still_open(pod_fit):
  row = lambda batch, fits, **extra: {"size": "large", "topology": "v6e-256", "slices": 1,
                                      "remat": "dots", "batch": batch, "fits": fits,
                                      "hbm_gib": batch / 1000, "hbm_limit_gib": 32.0, **extra}
  answered = [{**row(256, True), "remat": "none"}, {**row(4096, True), "remat": "none",
                                                     "largest": True}]
  open_rows = [row(256, True), row(15872, True), row(40000, False),
               row(20000, False, crashed="SIGSEGV"), row(4096, True)]
  assert pod_fit.open_searches(answered + open_rows) == [
      "largest batch not found yet: large v6e-256 x1 remat=dots (15872 fits with 15.87 of "
      "32 GiB; 20000 crashed (SIGSEGV))"]
  assert pod_fit.largest_summary(answered + open_rows)[2] == (
      "| large | v6e-256 | 1 | 4096 | >= 15872 (search open) |  |")
  answer = {**row(15872, True), "largest": True, "below_crash": 20000}
  assert pod_fit.largest_summary(answered + open_rows + [answer])[2] == (
      "| large | v6e-256 | 1 | 4096 | 15872 (below a compiler crash at 20000) (3.9x) |  |")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("when", ["running", "starting"])
def test_a_search_killed_by_a_signal_leaves_no_compile_running(tmp_path, when):
  # The parent compiles in a child (here: marks a file, then sleeps). SIGKILL the parent once
  # the child runs, or as soon as the child exists (before it can ask to die with its parent),
  # and the child ends too.
  mark = tmp_path / "child_runs"
  parent = subprocess.Popen(
      [sys.executable, "-c", "import sys, pod_fit; from tests.test_benchmarks import "
       "_mark_then_sleep; pod_fit.call_in_child(_mark_then_sleep, sys.argv[1])", str(mark)],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
          [ROOT, os.path.join(ROOT, "experiments", "benchmarks")])})
  children = lambda: [int(p) for p in os.listdir("/proc") if p.isdigit()
                      and _ppid(p) == parent.pid and b"spawn_main" in _cmdline(p)]
  try:
    deadline = time.time() + 180
    while (not mark.exists() if when == "running" else not children()) and (
        parent.poll() is None and time.time() < deadline):
      time.sleep(0.02)
    (child,) = children()  # not multiprocessing's resource tracker
  finally:
    parent.kill()
    parent.wait()
  deadline = time.time() + 60
  while _ppid(str(child)) is not None and time.time() < deadline:
    time.sleep(0.2)
  outlived = _ppid(str(child)) is not None
  if outlived:
    os.kill(child, signal.SIGKILL)
  assert not outlived, f"child {child} outlived its killed parent"


def _cmdline(pid: str) -> bytes:
  try:
    return open(f"/proc/{pid}/cmdline", "rb").read()
  except OSError:
    return b""


def _mark_then_sleep(path: str) -> None:
  open(path, "w").close()
  time.sleep(300)


def _ppid(pid: str) -> int | None:
  """The parent of a live process; None once it is gone (or a zombie: it ran to its end)."""
  try:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return None if fields[0] == "Z" else int(fields[1])
