"""The trainer: model size, mesh invariance, sharding golden file, exact resume, preemption,
the NaN guard and config validation."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from avmae import checkpoint, flops, masking, optim, sharding, train
from avmae.data import pipeline
from avmae.methods import METHODS
from avmae.models import vit
from configs import cav_mae
from data_prep import make_synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "cav_mae_tiny_shardings_d2_f2_t2.txt"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  make_synthetic.make_synthetic(out, num_train=64, num_eval=16, num_shards=2)
  return out


def tiny(data_dir, **overrides):
  c = cav_mae.get_config("tiny")
  c.data.dir = data_dir
  c.data.batch_size = 16
  c.total_steps = 3
  c.log_every_steps = 1
  c.image_every_steps = 1000
  c.checkpoint_every_steps = 1000
  return cav_mae.override(c, overrides)


def _metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _abstract_state(config, mesh):
  method = METHODS[config.method](config)
  opt = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(
      config.optimizer, config.total_steps, 10))
  with jax.set_mesh(mesh), nn.logical_axis_rules(config.sharding_rules):
    return jax.eval_shape(lambda: train.init_state(method, opt, method.example_batch(config.data.batch_size), 0))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_base_has_the_official_parameter_count(scan_layers):
  c = cav_mae.get_config("base")
  c.data.batch_size, c.model.scan_layers = 8, scan_layers
  boxed = _abstract_state(c, sharding.make_mesh(c.mesh))
  params = sharding.strip_logical_names(boxed["params"])
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 190_129_920
  assert params["decoder_pred_a"]["kernel"].shape == (512, 256)
  assert params["decoder_pred_v"]["kernel"].shape == (512, 768)
  assert set(params["blocks_u_0"]) >= {"norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"}
  if scan_layers:  # one stack per block kind, a leading "layers" axis
    assert params["blocks_a"]["attn"]["qkv_kernel"].shape == (11, 768, 3, 12, 64)
    assert params["decoder_blocks"]["mlp"]["fc1"]["kernel"].shape == (8, 512, 2048)
    assert not [k for k in params if k.startswith("blocks_a_")]
  else:
    assert params["blocks_a_0"]["attn"]["qkv_kernel"].shape == (768, 3, 12, 64)
    assert len([k for k in params if k.startswith("blocks_a_")]) == 11
    assert len([k for k in params if k.startswith("decoder_blocks_")]) == 8


def _official_sincos(embed_dim, grid_h, grid_w):
  """The reference's construction, rewritten: meshgrid(w, h), reshaped, first half from w."""
  grid = np.stack(np.meshgrid(np.arange(grid_w, dtype=np.float32),
                              np.arange(grid_h, dtype=np.float32)), axis=0)
  grid = grid.reshape([2, 1, grid_w, grid_h])

  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], 1)


@pytest.mark.parametrize("dim,h,w", [(768, 8, 64), (768, 14, 14), (512, 8, 64), (64, 16, 8)])
def test_position_embedding_matches_reference(dim, h, w):
  np.testing.assert_allclose(vit.sincos_2d(dim, h, w), _official_sincos(dim, h, w), atol=1e-6)


def test_loss_is_the_same_on_1_8_and_222_meshes(synthetic_dir, tmp_path):
  losses = {}
  for name, mesh in {"1": {"data": 1, "fsdp": 1, "tensor": 1},
                     "8": {"data": 8, "fsdp": 1, "tensor": 1},
                     "222": {"data": 2, "fsdp": 2, "tensor": 2}}.items():
    workdir = str(tmp_path / name)
    train.train(tiny(synthetic_dir, mesh=mesh), workdir)
    losses[name] = [m["loss"] for m in _metrics(workdir)]
  assert len(losses["1"]) == 3 and losses["1"][0] != losses["1"][2]
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-5)
  np.testing.assert_allclose(losses["222"], losses["1"], rtol=1e-5)


def _sharding_table(config):
  mesh = sharding.make_mesh(config.mesh)
  boxed = _abstract_state(config, mesh)
  shardings = sharding.logical_to_shardings(boxed["params"], mesh, config.sharding_rules)
  rows = jax.tree_util.tree_leaves_with_path(shardings)
  return "".join(f"{jax.tree_util.keystr(p)} {sharding.describe(s)}\n" for p, s in rows)


def test_parameter_shardings_match_golden_file():
  c = cav_mae.get_config("tiny")
  c.mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  c.data.batch_size = 8
  table = _sharding_table(c)
  if os.environ.get("AVMAE_UPDATE_GOLDEN"):
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(table)
  assert table == GOLDEN.read_text(), "set AVMAE_UPDATE_GOLDEN=1 to regenerate deliberately"
  assert "['blocks_a_0']['mlp']['fc1']['kernel'] P(fsdp, tensor)" in table


def _run(config_args, workdir, env_extra=None, **popen):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  cmd = [sys.executable, "-m", "avmae.train", "--config=configs/cav_mae.py:tiny",
         f"--workdir={workdir}", *config_args]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _args(data_dir, **kv):
  base = {"data.dir": data_dir, "data.batch_size": 16, "log_every_steps": 1,
          "image_every_steps": 1000, "checkpoint_every_steps": 1000}
  return [f"--config.{k}={v}" for k, v in {**base, **kv}.items()]


def _restore_params(workdir, step):
  """Parameters of a tiny checkpoint onto one device, whatever mesh or processes saved them."""
  config = tiny("")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = sharding.strip_logical_names(
      _abstract_state(config, sharding.make_mesh(config.mesh))["params"])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract)
  return checkpoint.load_params(os.path.join(workdir, "checkpoints", str(step)), target,
                                METHODS[config.method](config).model.layer_stacks)


def test_exact_resume_after_restart(synthetic_dir, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  for workdir, total in ((straight, 6), (split, 3), (split, 6)):
    p = _run(_args(synthetic_dir, total_steps=total), workdir)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
  assert "resumed from step 3" in out
  a, b = _metrics(straight), _metrics(split)
  assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
  assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bitwise on CPU
  pa, pb = _restore_params(str(straight), 6), _restore_params(str(split), 6)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_the_next_run_resumes(synthetic_dir, tmp_path):
  workdir = tmp_path / "w"
  p = _run(_args(synthetic_dir, total_steps=100000), workdir)
  lines = []
  for line in p.stdout:
    lines.append(line)
    if line.startswith("step 2:"):
      p.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + p.communicate(timeout=120)[0]
  assert p.returncode == 0, out[-3000:]
  saved = int(out.split("preempted: saved step ")[1].split(",")[0])
  assert saved >= 2
  p = _run(_args(synthetic_dir, total_steps=saved + 2), workdir)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0 and f"resumed from step {saved}" in out, out[-3000:]
  assert [m["step"] for m in _metrics(workdir)][-2:] == [saved + 1, saved + 2]


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(synthetic_dir, tmp_path):
  workdir = str(tmp_path)
  train.train(tiny(synthetic_dir, total_steps=2, checkpoint_every_steps=2), workdir)
  config = tiny(synthetic_dir, total_steps=6, checkpoint_every_steps=2)
  config.optimizer.learning_rate = float("inf")
  with pytest.raises(train.NonFiniteError,
                     match=r"non-finite loss, gradient norm or learning rate at step 3: "
                     r"stopping. The last good checkpoint is step 2"):
    train.train(config, workdir)
  mngr = checkpoint.manager(workdir, 3)
  assert mngr.all_steps() == [2]
  mngr.close()


def test_bad_overrides_fail_before_compiling_and_name_the_key(synthetic_dir, tmp_path):
  p = _run(_args(synthetic_dir) + ["--config.no_such_key=1"], tmp_path)
  out = p.communicate(timeout=120)[0]
  assert p.returncode != 0 and "no_such_key" in out, out[-2000:]
  with pytest.raises(ValueError, match=r"config.model.image_size=48 differs from "
                     r"data.image_size=32"):
    train.train(tiny(synthetic_dir, **{"model.image_size": 48}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config.model.mel_bins=128, but the dataset .* has 64"):
    train.train(tiny(synthetic_dir, **{"model.mel_bins": 128}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config.data.batch_size=12 is not divisible by the "
                     r"mesh's batch axes"):
    train.train(tiny(synthetic_dir, **{"data.batch_size": 12}), str(tmp_path))
  with pytest.raises(ValueError, match=r"mesh .* needs 16 devices"):
    train.train(tiny(synthetic_dir, mesh={"data": 16, "fsdp": 1, "tensor": 1}), str(tmp_path))
  with pytest.raises(ValueError, match=r"model.remat='some'; one of \['dots', 'full', 'none'\]"):
    train.train(tiny(synthetic_dir, **{"model.remat": "some"}), str(tmp_path))


def test_remat_keeps_parameters_loss_and_gradients():
  results = {}
  for remat in ("none", "full", "dots"):
    c = cav_mae.get_config("tiny")
    c.data.batch_size, c.model.remat = 4, remat
    method = METHODS[c.method](c)
    batch = method.example_batch(c.data.batch_size)
    batch["audio"] = jax.random.normal(jax.random.key(1), batch["audio"].shape)
    batch["frames"] = jax.random.randint(jax.random.key(2), batch["frames"].shape, 0, 256
                                         ).astype(batch["frames"].dtype)
    params = sharding.strip_logical_names(method.init(jax.random.key(0), batch))["params"]
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p: method.loss_fn(p, batch, masking.example_keys(jax.random.key(3), 4))[0]))
    results[remat] = (params, *loss_and_grad(params))
  params, loss, grads = results["none"]
  for remat in ("full", "dots"):
    # Same parameter tree (checkpoints are interchangeable), same loss and gradients.
    assert jax.tree.structure(results[remat][0]) == jax.tree.structure(params)
    np.testing.assert_allclose(results[remat][1], loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 results[remat][2], grads)


@pytest.mark.parametrize("size", sorted(cav_mae.MODEL_SIZES))
def test_every_size_builds(size):
  c = cav_mae.get_config(size)
  c.data.batch_size = 8
  boxed = _abstract_state(c, sharding.make_mesh(c.mesh))
  assert jax.tree.leaves(boxed["params"])


def test_inspect_model_prints_the_table_and_count():
  out = subprocess.run([sys.executable, "-m", "avmae.inspect_model",
                        "--config=configs/cav_mae.py:base", "--config.mesh.data=2",
                        "--config.mesh.fsdp=2", "--config.mesh.tensor=2"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "trainable parameters: 190129920" in out.stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu device(s)" in out.stdout
  row = [l for l in out.stdout.splitlines() if l.startswith("blocks_v_3/mlp/fc1/kernel ")]
  assert row and row[0].split()[1:] == ["(768,", "3072)", "2,359,296", "P(fsdp,", "tensor)"]


def test_init_checkpoint_loads_params_from_a_run_or_an_npz(synthetic_dir, tmp_path):
  first = str(tmp_path / "first")
  train.train(tiny(synthetic_dir, total_steps=2, checkpoint_every_steps=2), first)
  trained = _restore_params(first, 2)
  config = tiny(synthetic_dir)
  stacks = METHODS[config.method](config).model.layer_stacks
  mesh = sharding.make_mesh(config.mesh)
  abstract = _abstract_state(config, mesh)
  shardings = sharding.logical_to_shardings(abstract["params"], mesh, config.sharding_rules)
  target = checkpoint.abstract_with_shardings(
      sharding.strip_logical_names(abstract["params"]), shardings)
  loaded = checkpoint.load_params(os.path.join(first, "checkpoints", "2"), target, stacks)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(trained)}
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(target)):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    np.testing.assert_array_equal(np.asarray(x), flat[name], err_msg=name)
    assert x.sharding == s.sharding
  np.savez(tmp_path / "params.npz", **flat)
  from_npz = checkpoint.load_params(str(tmp_path / "params.npz"), target, stacks)
  for x, y in zip(jax.tree.leaves(from_npz), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  del flat["norm_a/scale"]
  np.savez(tmp_path / "partial.npz", **flat)
  with pytest.raises(ValueError, match=r"partial.npz: parameters missing \['norm_a/scale'\]"):
    checkpoint.load_params(str(tmp_path / "partial.npz"), target, stacks)
  with pytest.raises(ValueError, match=r"neither an .npz, a PyTorch state_dict \(.safetensors, "
                     r".pth, .pt, .bin\) nor a checkpoint step directory"):
    checkpoint.load_params(str(tmp_path), target, stacks)
  with pytest.raises(ValueError, match=r"model.pth: this method has no PyTorch layout"):
    checkpoint.load_params(str(tmp_path / "model.pth"), target, stacks)


def test_two_processes_train_like_one(synthetic_dir, tmp_path):
  """jax.distributed on localhost: 2 processes x 4 CPU devices vs 1 process x 8 devices."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  two = tmp_path / "two"
  args = _args(synthetic_dir, total_steps=3, **{"mesh.data": 8})
  procs = [_run(args + ["--num_processes=2", f"--process_id={i}",
                        f"--coordinator=localhost:{port}"], two,
                env_extra={"JAX_NUM_CPU_DEVICES": "4"}) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
  one = str(tmp_path / "one")
  train.train(tiny(synthetic_dir, mesh={"data": 8, "fsdp": 1, "tensor": 1}), one)
  np.testing.assert_allclose([m["loss"] for m in _metrics(two)],
                             [m["loss"] for m in _metrics(one)], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(_restore_params(str(two), 3)),
                  jax.tree.leaves(_restore_params(one, 3))):
    # Cross-process all-reduces sum in another order: Adam turns ~1e-9 gradient differences
    # of near-zero biases into ~1e-7 parameter differences (updates are ~5e-5 here).
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(synthetic_dir, tmp_path):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    workdir = str(tmp_path / dtype)
    train.train(tiny(synthetic_dir, dtype=dtype, total_steps=2, checkpoint_every_steps=2),
                workdir)
    losses[dtype] = [m["loss"] for m in _metrics(workdir)]
    assert {np.asarray(x).dtype for x in jax.tree.leaves(_restore_params(workdir, 2))} == {
        np.dtype("float32")}
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=3e-2)


TIMING_KEYS = ("examples_per_second", "tflops_per_second", "step_seconds",
               "data_wait_seconds", "device_wait_seconds", "checkpoint_seconds", "mfu")


def test_metrics_fetched_a_step_late_are_the_synchronous_loops(synthetic_dir, tmp_path):
  """The trainer runs a step ahead (metrics of step s are fetched after step s + 1 is
  dispatched, the next batch read onto the devices before): every logged value is the one a
  loop that waits for each step gets, and the step times and MFU are logged."""
  config = tiny(synthetic_dir, total_steps=5, log_every_steps=2)
  train.train(config, str(tmp_path))
  logged = _metrics(str(tmp_path))
  assert [m["step"] for m in logged] == [2, 4, 5]
  mesh = sharding.make_mesh(config.mesh)
  program = train.build_program(config, mesh, steps_per_epoch=4)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda: nn.meta.unbox(train.init_state(
        program.method, program.optimizer, program.method.example_batch(16), config.seed)),
                    out_shardings=program.state_shardings)()
    expected = {}
    with pipeline.Batches(config.data, "train", train=True, seed=config.seed,
                          global_batch_size=16, mesh=mesh) as batches:
      for step in range(1, 6):
        batch = next(batches)
        state, metrics = program.train_step(state, {k: batch[k] for k in program.abstract_batch})
        expected[step] = {k: float(v) for k, v in jax.device_get(metrics).items()}
  for record in logged:
    values = {k: v for k, v in record.items() if k not in TIMING_KEYS + ("step",)}
    assert values == {**expected[record["step"]], "skipped_records": 0.0}, record["step"]
    assert all(record[k] >= 0 for k in TIMING_KEYS), record
  assert logged[-1]["step_seconds"] >= logged[-1]["device_wait_seconds"]


def test_a_killed_run_logs_each_step_once_and_writes_a_trace_and_the_cache(synthetic_dir,
                                                                           tmp_path):
  """SIGKILL after steps past the last checkpoint were logged; the next run resumes and
  rewrites metrics.jsonl to the restored step, so each step is there once. The same run traces
  config.profile_steps and fills config.compilation_cache_dir."""
  workdir, cache = tmp_path / "w", tmp_path / "cache"
  extra = ["--config.profile_steps=(2, 3)", f"--config.compilation_cache_dir={cache}"]
  p = _run(_args(synthetic_dir, total_steps=100000, checkpoint_every_steps=2) + extra, workdir)
  logged = 0
  for line in p.stdout:
    if line.startswith("step "):
      logged = int(line.split()[1].rstrip(":"))
      saved = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
      if saved and logged > max(saved) and logged > 3:
        p.kill()
        break
  p.wait(timeout=60)
  assert [m["step"] for m in _metrics(workdir)][-1] >= logged > max(saved)
  traces = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0
  assert any("train_step" in name for name in os.listdir(cache)), os.listdir(cache)
  p = _run(_args(synthetic_dir, total_steps=logged + 1, checkpoint_every_steps=2), workdir)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0, out[-3000:]
  resumed = int(out.split("resumed from step ")[1].split()[0])
  assert resumed < logged  # steps after the checkpoint ran again
  assert [m["step"] for m in _metrics(workdir)] == list(range(1, logged + 2))


def test_keep_period_and_a_changed_shape_on_resume_fails_naming_the_key(synthetic_dir,
                                                                       tmp_path):
  workdir = str(tmp_path)
  train.train(tiny(synthetic_dir, total_steps=6, checkpoint_every_steps=1, keep_checkpoints=1,
                   keep_period=3, log_every_steps=3), workdir)
  mngr = checkpoint.manager(workdir, 1)
  assert mngr.all_steps() == [3, 6]  # the newest, and every 3rd step for probe curves
  mngr.close()
  with pytest.raises(ValueError, match=r"changed: config.model.embed_dim=32 \(the checkpoint "
                     r"has 64\)"):
    train.train(tiny(synthetic_dir, total_steps=8, **{"model.embed_dim": 32}), workdir)
  with pytest.raises(ValueError, match=r"config.model.audio_frames=64 \(the checkpoint has "
                     r"128\), config.data.audio_frames=64 \(the checkpoint has 128\)"):
    train.train(tiny(synthetic_dir, total_steps=8, **{"model.audio_frames": 64,
                                                       "data.audio_frames": 64}), workdir)
  # What leaves the parameters as they are may change: remat, scan_layers, the mesh, steps.
  train.train(tiny(synthetic_dir, total_steps=7, **{"model.remat": "full"}), workdir)


def test_peak_flops_per_device_kind():
  assert flops.peak_flops_per_device("TPU v4") == 275e12
  assert flops.peak_flops_per_device("TPU v5 lite") == 197e12  # v5e
  assert flops.peak_flops_per_device("TPU v5") == 459e12  # v5p
  assert flops.peak_flops_per_device("TPU v6 lite") == 918e12  # v6e
  assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops_per_device("NVIDIA T4") is None
  # CPU: a measured figure for the whole process (its simulated devices share the cores).
  assert flops.peak_flops(jax.devices()) == flops.CPU_PEAK_FLOPS_PER_PROCESS
