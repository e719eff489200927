"""CAV-MAE pretraining. `--config=configs/cav_mae.py:SIZE` with SIZE tiny, demo, tiny_video,
small, base, base_video, large, base_official or scale_pp_official.

tiny trains on the synthetic dataset on a CPU (unit tests); demo is the tiny model with the CPU
recipe that learns in a few minutes (the README demo; docs/learning_signal.md).

base is the recommended AudioSet recipe: the official model, masks, losses, optimizer (Adam
(0.95, 0.999), L2 decay 5e-7, lr 5e-5 halved at epochs 10, 15 and 20 of 25), batch 48, 1024 x
128 audio, one 224 px frame, noise + time-roll augmentation; it differs from the official run
(base_official, which has it exactly) where the official choice is an accident of its setup:
- a 1000-step linear warmup (official: none; `--warmup True` is parsed, never used): Adam's
  first steps from fresh moment estimates are its least reliable; 0.1 % of the run.
- negatives from the whole global batch (official: each of its 4 GPUs' 12 clips, an artefact of
  DataParallel), so the recipe means the same on one chip or a pod.
- the loss averaged, not summed over 4 replicas: with Adam the sum only divides the effective
  weight decay and eps by 4 (see base_official); the logged loss is the official log's / 4.
- log-mel normalised with the dataset's own statistics (official: AudioSet's constants -5.081,
  4.4849), right for any dataset.
- training starts from random weights unless `init_checkpoint` names parameters to start from.
  The official run starts from ImageNet MAE weights (IN-initial.pth); to do the same:
      python -m avmae.train --config=configs/cav_mae.py:base --config.data.dir=DATA \
          --config.init_checkpoint=IN-initial.pth --workdir=runs/cav_mae
  (the state_dict is mapped as `python -m avmae.import_torch` maps it, which lists the keys
  CAVMAE lacks, IN-initial's cls tokens, and ignores them, as the official strict=False load
  does; facebookresearch/mae ViT checkpoints load too, mapped as the official
  adapt_vmae_weights.py does. avmae.import_torch also converts such a file once into a
  workdir, whose checkpoints/0 then serves as init_checkpoint.)

base_official and scale_pp_official: the official runs, every value the official one
(egs/audioset/run_cavmae_pretrain_base.sh and run_cavmae_pretrain_scale++.sh, src/
run_cavmae_pretrain.py, src/traintest_cavmae.py, src/dataloader.py; tests/
test_cav_mae_official.py cites each): no warmup; lr halved at epochs 10, 15 and 20 (MultiStepLR
stepped once per epoch); contrastive negatives within groups of the per-GPU batch (batch / 4);
AudioSet's fixed log-mel constants; noise then time-roll augmentation; mask 0.75.
- The official loss is summed over its 4 DataParallel replicas (`loss.sum()`), 4x avmae's mean.
  For Adam with coupled L2 decay a loss k times larger is the same optimizer with weight decay
  and eps divided by k (Adam's update does not change when the gradient is scaled, apart from
  eps): these configs take that equivalent scaling, not a summed loss, so logged losses are the
  official log's / 4 (tests/test_optim.py checks the equivalence against torch.optim.Adam).
- Start them from IN-initial.pth as above (the official runs do), with `:base_official` or
  `:scale_pp_official` in the command.
- Frames: the official frames are extracted at 224 px by extract_video_frame.py with
  torchvision's default bilinear resize and centre crop, as data_prep.build's default; the
  official dataloader's bicubic resize leaves those 224 px frames unchanged. For frames of
  another size it would resize them bicubic: `python -m data_prep.build --frame_resize=bicubic`.
- Not reproduced: fp16 autocast with a GradScaler (here bfloat16, which needs no scaler);
  epochs of ceil(N / batch) steps with the last batch padded (official drops it: one step less).
"""

import ml_collections

from configs import data

# Encoder width/depth/heads and decoder width/depth/heads per size; patch 16 unless noted.
MODEL_SIZES = {
    "tiny": dict(embed_dim=64, modality_specific_depth=2, shared_depth=1, num_heads=4,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, patch_size=8),
    "small": dict(embed_dim=384, modality_specific_depth=11, shared_depth=1, num_heads=6,
                  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, patch_size=16),
    "base": dict(embed_dim=768, modality_specific_depth=11, shared_depth=1, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, patch_size=16),
    "large": dict(embed_dim=1024, modality_specific_depth=23, shared_depth=1, num_heads=16,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, patch_size=16),
}

# Input geometry: (audio frames, mel bins, image size), tiny matches the synthetic defaults.
INPUT_SIZES = {"tiny": (128, 64, 32), "small": (1024, 128, 224), "base": (1024, 128, 224),
               "large": (1024, 128, 224)}
# demo: the tiny encoders with a one-block decoder and the CPU recipe of RECIPES, on 64 px
# frames. At 32 px, 8 px patches cut the synthetic shapes into fragments that the tiny ViT
# barely learns even from labels; the one-block decoder buys the steps that retrieval needs
# within 5 minutes (docs/learning_signal.md).
MODEL_SIZES["demo"] = {**MODEL_SIZES["tiny"], "decoder_depth": 1}
INPUT_SIZES["demo"] = (128, 64, 64)

# Clips instead of one frame (VideoMAE's video side): tubelets of 2 frames x patch x patch,
# tube masking at 0.9 and the per-tubelet target. base_video: base on 16 frames (8 x 14 x 14
# = 1568 video tokens); tiny_video: the demo model and recipe on 8 frames of 64 px.
def _clips(num_frames: int) -> dict:
  return {"model.num_frames": num_frames, "model.tubelet_size": 2,
          "data.num_frames": num_frames, "masking.mode_v": "tube", "masking.ratio_v": 0.9,
          "loss.video_target": "tubelet"}


MODEL_SIZES["base_video"], INPUT_SIZES["base_video"] = MODEL_SIZES["base"], INPUT_SIZES["base"]
MODEL_SIZES["tiny_video"], INPUT_SIZES["tiny_video"] = MODEL_SIZES["demo"], INPUT_SIZES["demo"]

# Logical axis -> mesh axes. Parameters: FSDP shards `embed`, tensor parallelism splits the
# MLP and attention heads. Activations: the batch over (data, fsdp), heads/MLP over tensor.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("head_dim", None),
    ("tokens", None),
    ("act_embed", None),
    ("patch", None),
    ("norm", None),
    ("layers", None),  # the leading layer axis of model.scan_layers' stacked parameters
)


CPU_SIZES = ("tiny", "demo", "tiny_video")

# The demo's CPU recipe over the tiny defaults (docs/learning_signal.md says why each): long
# enough for the contrastive term to escape its collapsed start, the contrastive term weighed
# above the reconstruction, both directions, and more of the video visible to the encoder.
RECIPES = {"demo": {
    "total_steps": 2000,
    "checkpoint_every_steps": 250,
    "keep_checkpoints": 9,
    "image_every_steps": 500,
    "loss.contrastive_weight": 3.0,
    "loss.bidirectional": True,
    "masking.ratio_v": 0.25,
}}
RECIPES["base_video"] = _clips(16)
# 1000 steps: within 10 minutes on 2 CPU cores (a step costs 2.4x the demo's); on dataset
# seed 0 (the recipe's) the video probe reached 0.98 at step 1000 of 2000, random init 0.48.
RECIPES["tiny_video"] = {**RECIPES["demo"], **_clips(8), "total_steps": 1000,
                         "keep_checkpoints": 5}

# The official runs (tests/test_cav_mae_official.py checks each value against the official
# scripts): 4 GPUs under DataParallel, each taking batch / 4 clips, the 4 losses summed.
OFFICIAL_REPLICAS = 4
AUDIOSET_2M_CLIPS = 1_772_023  # the official training set (as2m_pretrain_base.txt: "Dataset has")


def _official(batch_size: int, learning_rate: float) -> dict:
  """The official recipe at `batch_size` and `learning_rate` (the base model's defaults hold
  the rest: mask 0.75, loss weights, norm_pix, temperature, Adam betas, 1024 x 128 x 224)."""
  return {
      "total_steps": 25 * -(-AUDIOSET_2M_CLIPS // batch_size),  # 25 epochs
      "data.batch_size": batch_size,
      "data.log_mel_norm": "audioset_cav_mae",
      "data.augment.noise": 0.1,
      "data.augment.time_roll": True,
      "loss.group_size": batch_size // OFFICIAL_REPLICAS,
      "optimizer.name": "adam",
      "optimizer.learning_rate": learning_rate,
      "optimizer.warmup_steps": 0,
      "optimizer.schedule": "step",
      "optimizer.decay_epochs": (10, 15, 20),
      "optimizer.decay_factor": 0.5,
      # The loss summed over the replicas, as Adam's equivalent: decay and eps / replicas.
      "optimizer.weight_decay": 5e-7 / OFFICIAL_REPLICAS,
      "optimizer.eps": 1e-8 / OFFICIAL_REPLICAS,
      "optimizer.no_decay": (),
      "optimizer.grad_clip_norm": 0.0,
  }


# (batch, lr): run_cavmae_pretrain_base.sh and run_cavmae_pretrain_scale++.sh.
OFFICIAL_RUNS = {"base_official": (48, 5e-5), "scale_pp_official": (256, 2e-4)}
for _name, (_batch, _lr) in OFFICIAL_RUNS.items():
  MODEL_SIZES[_name], INPUT_SIZES[_name] = MODEL_SIZES["base"], INPUT_SIZES["base"]
  RECIPES[_name] = _official(_batch, _lr)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  return sized_config("cav_mae", arg, MODEL_SIZES, _base_config, RECIPES)


def sized_config(module: str, arg: str, sizes: dict, base_config, recipes: dict
                 ) -> ml_collections.ConfigDict:
  """configs/<module>.py's config of size `arg` (default tiny): `base_config(size)` with the
  size's recipe overrides; an unknown size fails listing the known ones."""
  size = arg or "tiny"
  if size not in sizes:
    raise ValueError(f"configs/{module}.py: unknown size {size!r}; one of {sorted(sizes)}")
  return override(base_config(size), recipes.get(size, {}))


def override(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys ("loss.temperature") of `c` in place; returns it."""
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def _base_config(size: str) -> ml_collections.ConfigDict:
  official = size not in CPU_SIZES
  c = ml_collections.ConfigDict()
  c.method = "cav_mae"
  c.seed = 0
  c.total_steps = 25 * 36_900 if official else 300  # base: 25 epochs of AS-2M at 48
  c.log_every_steps = 100 if official else 10
  c.checkpoint_every_steps = 5000 if official else 100
  c.keep_checkpoints = 3
  c.image_every_steps = 5000 if official else 100
  c.dtype = "bfloat16" if official else "float32"  # compute dtype; parameters float32
  # Within a slice (ICI); across slices (DCN) the mesh is dcn_mesh (each axis's size is the
  # product): data parallelism across slices by default. Both: -1 = the remaining devices.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.dcn_mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = SHARDING_RULES
  # Parameters to start from: a checkpoint step dir, an .npz, or an official state_dict
  # (.pth, .safetensors; e.g. IN-initial.pth, see the docstring).
  c.init_checkpoint = ""
  c.aot_executable = ""  # a train step compiled by `avmae.aot --save` (checked, then run)
  c.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0: off)
  c.profile_steps = ()  # (first, last): a jax.profiler trace of those steps in WORKDIR/profile
  c.compilation_cache_dir = ""  # XLA's persistent compilation cache ("": off)
  # The coordination service of multi-process runs (avmae/distributed.py): a process that sends
  # no heartbeat for heartbeat_timeout_seconds counts as dead and every other process stops.
  c.distributed = ml_collections.ConfigDict(dict(
      initialization_timeout_seconds=300, heartbeat_timeout_seconds=100,
      shutdown_timeout_seconds=300))

  audio_frames, mel_bins, image_size = INPUT_SIZES[size]
  c.data = data.get_config("")
  c.data.batch_size = 48 if official else 32
  c.data.audio_frames = audio_frames
  c.data.image_size = image_size
  c.data.augment.noise = 0.1 if official else 0.0

  c.model = ml_collections.ConfigDict(dict(
      audio_frames=audio_frames, mel_bins=mel_bins, image_size=image_size, mlp_ratio=4.0,
      # Recompute activations in the backward pass: "none", "full" or "dots"
      # (avmae/models/stacks.py REMAT_POLICIES); same parameters, less activation memory.
      remat="none",
      # Each stack of identical blocks as one nn.scan (compiles one block per stack; the
      # parameters get a leading "layers" axis). Checkpoints record it; loading converts.
      # Off by default: on a TPU the unrolled base step needs less memory (3.67 against 5.31
      # GiB per chip at batch 48 on a v5e-16), though it compiles 2-7x slower. On a CPU the
      # scanned base step is 30 % faster (docs/speed.md).
      scan_layers=False,
      # Frames per clip and frames per tubelet (1, 1: one frame, the official CAV-MAE).
      num_frames=1, tubelet_size=1,
      **MODEL_SIZES[size]))

  # mode_v: "unstructured" (random over all video tokens, official) or "tube" (VideoMAE: one
  # spatial mask repeated over the clip's time slots).
  c.masking = ml_collections.ConfigDict(dict(ratio_a=0.75, ratio_v=0.75, mode_a="unstructured",
                                             mode_v="unstructured"))
  c.loss = ml_collections.ConfigDict(dict(
      mae_weight=1.0, contrastive_weight=0.01 if official else 0.1, temperature=0.05,
      bidirectional=False,
      norm_pix=True,
      # "patch": the video target as the audio one (norm_pix over each patch, official);
      # "tubelet": VideoMAE's, each tubelet normalised per channel.
      video_target="patch",
      group_size=0))  # 0: negatives from the whole global batch; official 4-GPU run: 12

  c.optimizer = ml_collections.ConfigDict(dict(
      # "adam": L2 decay added to the gradient (torch.optim.Adam, official, wd 5e-7); "adamw":
      # decoupled (the MAE recipe's wd 0.05 is meant for it: coupled, it shrinks the weights).
      name="adam" if official else "adamw",
      learning_rate=5e-5 if official else 1e-3,
      b1=0.95, b2=0.999, eps=1e-8,
      weight_decay=5e-7 if official else 0.05,
      no_decay=() if official else ("bias", "scale", "modality", "mask_token"),
      grad_clip_norm=0.0 if official else 1.0,  # 0: no clipping (official)
      # Microbatches per step (gradient accumulation inside the jitted step). The contrastive
      # term then takes its negatives within each microbatch: loss.group_size semantics.
      accumulation_steps=1,
      warmup_steps=1000 if official else 20,
      schedule="step" if official else "cosine",
      decay_epochs=(10, 15, 20),  # "step": lr times decay_factor at each of these epochs
      decay_factor=0.5))
  return c
