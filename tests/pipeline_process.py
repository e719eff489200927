"""One process of a real multi-process read: `python pipeline_process.py ID COUNT PORT DIR OUT
[LAYOUT]`.

Started by test_pipeline.py; each process joins jax.distributed on localhost with 8 / COUNT
CPU devices and reads global batches over the 8-device mesh. LAYOUT `data` (default): the
mesh is data parallel over every device and process 0 saves the gathered batches to OUT.
`tensor_across`: mesh {"data": 4, "fsdp": 1, "tensor": 2} over the devices interleaved so
that the tensor axis spans the processes (tensor index = process); every process saves what
each of its devices holds (rows and values) to OUT.<ID>.npz.
"""

import sys

import jax


def main() -> None:
  process_id, count, port, data_dir, out, *layout = sys.argv[1:]
  layout = layout[0] if layout else "data"
  jax.config.update("jax_num_cpu_devices", 8 // int(count))
  jax.config.update("jax_platforms", "cpu")
  jax.distributed.initialize(f"localhost:{port}", num_processes=int(count),
                             process_id=int(process_id))
  import numpy as np
  from jax.experimental import multihost_utils

  from avmae import sharding
  from avmae.data import pipeline
  from configs import data

  cfg = data.get_config(data_dir)
  cfg.audio_frames, cfg.image_size = 16, 16
  if layout == "tensor_across":
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(int(count))]
    devices = [d for group in zip(*by_process) for d in group]  # p0 d0, p1 d0, p0 d1, ...
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2}, devices=devices)
    for t in range(2):  # the premise: tensor replica t lives on process t
      assert {d.process_index for d in mesh.devices[:, :, t].flat} == {t}, mesh.devices
  else:
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  results = {}
  with pipeline.Batches(cfg, "train", train=True, seed=3, global_batch_size=8,
                        mesh=mesh) as batches:
    for step in range(6):
      batch = next(batches)
      assert batch["audio"].shape == (8, 16, 16)
      assert len(batch["audio"].addressable_shards) == 8 // int(count)
      for key, value in batch.items():
        if layout == "data":
          results[f"{key}_{step}"] = multihost_utils.process_allgather(value, tiled=True)
          continue
        for shard in value.addressable_shards:
          rows = range(8)[shard.index[0]]
          results[f"{key}_{step}_device{shard.device.id}"] = np.asarray(shard.data)
          results[f"rows_{step}_device{shard.device.id}"] = np.array([rows.start, rows.stop])
    results["num_skipped"] = np.array(batches.num_skipped)
  if layout == "tensor_across":
    np.savez(f"{out}.{process_id}.npz", **results)
  elif int(process_id) == 0:
    np.savez(out, **results)


if __name__ == "__main__":
  main()
