"""data_prep.build as an Apache Beam pipeline, for datasets one machine cannot convert.

The same shard task (data_prep.build.run_shard) runs on Beam workers; the launcher then
writes dataset_info.json from the shards' done markers. Output bytes equal a local run's.

    python -m data_prep.build --manifest=... --media_root=... --out_dir=DIR \
        --runner=DataflowRunner -- --project=P --region=R --temp_location=gs://...

Runner options after `--` go to Beam's PipelineOptions. Workers write shards with ordinary
file operations, so DIR (and the media) must be a filesystem every worker mounts at the same
path (NFS, Filestore, a GCS FUSE mount); DirectRunner needs nothing more.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from data_prep import build as local
from data_prep import manifests


def _run(task: local.ShardTask) -> str:
  return local.run_shard(task)["shard"]["name"]


def build(manifest: manifests.Manifest, out_dir: str, options: local.BuildOptions,
          shards: dict[str, int], runner: str, pipeline_args: Sequence[str] = (),
          default_split: str = "train", name: str = "avmae") -> dict[str, Any]:
  os.makedirs(out_dir, exist_ok=True)
  tasks = local.plan(manifest, out_dir, options, shards, default_split)
  flat = [t for ts in tasks.values() for t in ts]
  with beam.Pipeline(runner=runner, options=PipelineOptions(list(pipeline_args))) as p:
    _ = (p | "shards" >> beam.Create(flat)
         | "reshuffle" >> beam.Reshuffle()  # spread shards over workers
         | "convert" >> beam.Map(_run))
  summaries = {}
  for task in flat:
    with open(os.path.join(out_dir, task.name + local.DONE_SUFFIX)) as f:
      summaries[task.name] = json.load(f)
  return local.finish(out_dir, manifest, options, tasks, summaries, name)
