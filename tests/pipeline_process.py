"""One process of a real multi-process read: `python pipeline_process.py ID COUNT PORT DIR OUT`.

Started by test_pipeline.py; each process joins jax.distributed on localhost with 4 CPU
devices, reads global batches over the 8-device mesh and saves what it sees.
"""

import sys

import jax


def main() -> None:
  process_id, count, port, data_dir, out = sys.argv[1:]
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
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  results = {}
  with pipeline.Batches(cfg, "train", train=True, seed=3, global_batch_size=8,
                        mesh=mesh) as batches:
    for step in range(6):
      batch = next(batches)
      assert batch["audio"].shape == (8, 16, 16)
      assert len(batch["audio"].addressable_shards) == 8 // int(count)
      for key, value in batch.items():
        results[f"{key}_{step}"] = multihost_utils.process_allgather(value, tiled=True)
  if int(process_id) == 0:
    np.savez(out, **results)


if __name__ == "__main__":
  main()
