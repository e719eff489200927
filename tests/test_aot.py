"""avmae.aot: the trainer's step compiled for compile-only TPU devices (libtpu) and for this
machine; memory, FLOPs and collectives; the HBM-overflow exit; saved executables; hybrid
multi-slice meshes."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from avmae import aot, sharding, train
from configs import cav_mae
from test_train import REPO, _metrics, synthetic_dir, tiny  # noqa: F401 (a fixture)


def _tpu_tiny(**overrides):
  # FSDP over 2 chips of each slice: parameter all-gathers and gradient reduce-scatters.
  return cav_mae.override(cav_mae.get_config("tiny"), {"mesh.fsdp": 2, **overrides})


@pytest.mark.parametrize("name,libtpu,chips", [
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v4-4096", "v4:8x16x16", 2048),
    ("v5litepod-256", "v5e:16x16", 256), ("v5e-4", "v5e:2x2", 4), ("v5p-128", "v5:4x4x4", 64),
    ("v6e-256", "v6e:16x16", 256)])
def test_accelerator_names_map_to_libtpu_topologies(name, libtpu, chips):
  t = aot.parse_topology(name)
  assert (t.libtpu_name, t.chips) == (libtpu, chips)


def test_an_unknown_topology_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown TPU topology 'v5e-12'; known: .*v4-8.*v5p-128"
                     r".*v6e-256"):
    aot.parse_topology("v5e-12")
  with pytest.raises(ValueError, match="unknown TPU topology 'v4-6'"):
    aot.parse_topology("v4-6")  # 3 chips: not a slice Cloud TPU provisions


def test_collectives_count_loop_bodies_once_per_iteration():
  # A while with XLA's known trip count, and a scan's (counter < 5) without one.
  hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  %ag = bf16[4,2]{1,0} all-gather(%y), dimensions={0}
}

%cond (c: (s32[], f32[8])) -> pred[] {
  %n = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%scanned (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %g = f32[2,8]{1,0} all-gather(%z), dimensions={0}
}

%fused (q: f32[2]) -> f32[4] {
  ROOT %rs = f32[4]{0} reduce-scatter(%q), dimensions={0}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %v = (s32[], f32[8]) while(%t2), condition=%cond, body=%scanned
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
  %s = (f32[1,4]{1,0}, u32[], token[]) send(%b, %tok), is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %d = f32[8]{0} all-reduce-done(%ar2)
}
"""
  got = aot.collectives(hlo)
  assert got == {"within/all-reduce": {"count": 12, "bytes": 12 * 32},
                 "within/all-gather": {"count": 12 + 5, "bytes": 12 * 16 + 5 * 64},
                 "within/reduce-scatter": {"count": 1, "bytes": 16},
                 "across/all-reduce": {"count": 1, "bytes": 16}}


def test_the_hybrid_mesh_puts_data_across_slices():
  devices = aot.topology_devices(aot.parse_topology("v5e-4"), num_slices=2)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices,
                            dcn={"data": -1, "fsdp": 1, "tensor": 1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  np.testing.assert_array_equal(slices, np.broadcast_to(np.arange(2)[:, None, None], (2, 2, 2)))
  with pytest.raises(ValueError, match=r"dcn mesh \{'data': 3\} needs 3 slices, but the "
                     r"devices span 2"):
    sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices, dcn={"data": 3})


@pytest.mark.parametrize("num_slices", [1, 2])
def test_tiny_step_compiles_for_a_tpu_topology(num_slices):
  r = aot.compile_step(_tpu_tiny(), "v5e-4", num_slices, train_examples=2048)
  assert r.devices == 4 * num_slices and r.fits and r.hbm_bytes == 16 * 2**30
  assert r.mesh == {"data": 2 * num_slices, "fsdp": 2, "tensor": 1}
  assert r.memory["argument"] > 0 and r.memory["temporary"] > 0
  assert 0.8 < r.xla_flops / r.analytic_flops < 1.5
  # FSDP within the slice; gradients all-reduced across slices only when there are two.
  assert r.collectives["within/all-gather"]["count"] > 0
  across = {k for k in r.collectives if k.startswith("across/")}
  assert across == set() if num_slices == 1 else "across/all-reduce" in across
  if num_slices == 2:
    assert r.collectives["across/all-reduce"]["bytes"] > 0
  text = aot.format_report(r)
  assert "HBM, headroom" in text and "XLA / analytic" in text and "within/all-gather" in text


def test_a_scanned_step_reports_no_xla_flops_and_counts_collectives_per_layer():
  # XLA counts a loop body once: its FLOPs would read ~1/depth of the step's.
  reports = {scan: aot.compile_step(_tpu_tiny(**{"model.scan_layers": scan,
                                                 "model.modality_specific_depth": 4}),
                                    "v5e-4", 1, train_examples=2048) for scan in (False, True)}
  assert reports[True].xla_flops is None and reports[False].xla_flops > 0
  assert "XLA n/a (the program loops" in aot.format_report(reports[True])
  # The gradients' all-reduce moves the same bytes whether the layers loop or not.
  np.testing.assert_allclose(reports[True].collectives["within/all-reduce"]["bytes"],
                             reports[False].collectives["within/all-reduce"]["bytes"], rtol=0.05)


def test_a_step_too_big_for_the_chip_exits_2_with_the_levers():
  p = subprocess.run(
      [sys.executable, "-m", "avmae.aot", "--config=configs/cav_mae.py:tiny",
       "--topology=v5e-4", "--train_examples=2048", "--config.data.batch_size=65536"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 2, p.stderr[-3000:]
  assert "GiB per chip" in p.stderr and "GiB available" in p.stderr
  for lever in ("model.remat", "mesh.fsdp", "data.batch_size", "optimizer.accumulation_steps"):
    assert lever in p.stderr


def test_a_saved_executable_trains_like_the_jitted_step_and_a_mismatch_is_refused(
    synthetic_dir, tmp_path):
  config = tiny(synthetic_dir)
  path = str(tmp_path / "step.bin")
  p = subprocess.run(
      [sys.executable, "-m", "avmae.aot", "--config=configs/cav_mae.py:tiny",
       "--topology=local", f"--save={path}", f"--config.data.dir={synthetic_dir}",
       "--config.data.batch_size=16", "--config.total_steps=3"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert p.returncode == 0, p.stderr[-3000:]
  assert "saved the compiled step" in p.stdout and "no HBM limit" in p.stdout
  train.train(config, str(tmp_path / "jit"))
  train.train(cav_mae.override(tiny(synthetic_dir), {"aot_executable": path}),
              str(tmp_path / "aot"))
  np.testing.assert_allclose([m["loss"] for m in _metrics(str(tmp_path / "aot"))],
                             [m["loss"] for m in _metrics(str(tmp_path / "jit"))], rtol=1e-6)
  changed = cav_mae.override(tiny(synthetic_dir), {"aot_executable": path,
                                                   "loss.temperature": 0.1})
  with pytest.raises(ValueError, match=r"compiled for another setup.*loss.temperature=0.05 "
                     r"-> 0.1"):
    train.train(changed, str(tmp_path / "changed"))
  assert not os.path.exists(tmp_path / "changed" / "metrics.jsonl")
  one_device = cav_mae.override(tiny(synthetic_dir), {"aot_executable": path,
                                                      "mesh.data": 1})
  with pytest.raises(ValueError, match=r"devices: compiled for .*'count': 8.*'count': 1"):
    train.train(one_device, str(tmp_path / "one"))
