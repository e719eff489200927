"""Frozen-feature evaluation: `python -m avmae.probe --config=configs/probe.py:WORKDIR`.

WORKDIR is a training workdir (its config.json gives the model). Keys users script against:
checkpoint_dir, steps, random_init, data.dir, modes, sweep.lrs, sweep.weight_decays.
"""

import ml_collections

from configs import data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.checkpoint_dir = arg  # a training workdir
  c.steps = ""  # "": the latest saved step; "all"; or "1000,2000"
  c.random_init = False  # probe a randomly initialised encoder of the same shape instead
  # Also probe a random init of the same shape beside the checkpoints (step "random_init"
  # in the results, the dashed lines of curve.png): the baseline every number needs.
  c.random_baseline = True
  c.seed = 0
  # data.dir: one dataset, or several separated by commas. Frame/audio sizes come from the
  # checkpoint's config; all_frames averages the features of every frame of a clip.
  c.data = data.get_config("")
  c.data.batch_size = 64
  c.data.augment.time_roll = False
  c.splits = ml_collections.ConfigDict(dict(
      train="train", val="", test="eval",
      val_fraction=0.2))  # val "": hold out this fraction of train (by record) for selection
  c.modes = ()  # (): every mode of the method (CAV-MAE: audio, video, audio_video)
  # "final": the final features; "3": the mean-pooled output of layer 3 (0: the embeddings);
  # "weighted": every layer, combined by a learned softmax-weighted sum (AV-SUPERB).
  c.layer = "final"
  c.head = "bn_linear"  # bn_linear (MAE protocol: frozen standardisation) | linear | ln_linear
  c.sweep = ml_collections.ConfigDict(dict(
      lrs=(1e-2, 3e-2, 1e-1, 3e-1, 1.0), weight_decays=(0.0, 0.05), steps=300,
      batch_size=128))
  c.retrieval = True  # audio<->video recall@k from the contrastive embeddings
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.cache = True  # frozen features cached under WORKDIR/features
  return c
