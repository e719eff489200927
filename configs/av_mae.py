"""Audiovisual MAE pretraining (Georgescu et al., ICCV 2023). `--config=configs/av_mae.py:SIZE`
with SIZE tiny, base or large.

large is the released AudioSet recipe (scenic projects/av_mae/configs/audioset/pretrain.py,
ViT-L/16x2): mid fusion (22 separate layers per modality, then 2 joint ones), one decoder
shared by both modalities, masks 0.7 (spectrogram) and 0.9 (video), 16 frames at stride 4
in 2 x 16 x 16 tubelets, 10 s of audio as 1000 x 128, global batch 512, Adam (0.9, 0.95)
with decoupled weight decay 0.05 on kernels, lr 3e-4 * 512 / 256 with 4 warmup epochs then
cosine to 0, 120 epochs of 3627 steps. base is the same recipe at ViT-B. Not reproduced:
official crops 224 px at random from frames resized to 256 on the short side; here frames
come at data.image_size (data.augment.random_resized_crop is the nearest lever).

tiny is the CPU size for tests and the demo: the tiny_video geometry of configs/cav_mae.py
(8 frames of 64 px, 128 x 64 log-mel, 8 px patches) with the same strategies and masks.
"""

import ml_collections

from configs import cav_mae, data

# Encoder width/depth/heads, decoder width/depth/heads (scenic's B and L), patch 16.
MODEL_SIZES = {
    "tiny": dict(embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=1,
                 decoder_num_heads=4, patch_size=8, fusion_layers=1),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384,
                 decoder_depth=4, decoder_num_heads=6, patch_size=16, fusion_layers=2),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                  decoder_depth=4, decoder_num_heads=8, patch_size=16, fusion_layers=2),
}
# (audio frames, mel bins, image size, frames per clip, frame stride)
INPUT_SIZES = {"tiny": (128, 64, 64, 8, 1), "base": (1000, 128, 224, 16, 4),
               "large": (1000, 128, 224, 16, 4)}
CPU_SIZES = ("tiny",)
TRAIN_EXAMPLES = 1_857_210  # the official AudioSet-2M training set
RECIPES = {"tiny": {"total_steps": 1000, "checkpoint_every_steps": 250, "keep_checkpoints": 5,
                    "image_every_steps": 250}}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  return cav_mae.sized_config("av_mae", arg, MODEL_SIZES, _base_config, RECIPES)


def _base_config(size: str) -> ml_collections.ConfigDict:
  official = size not in CPU_SIZES
  batch = 512 if official else 32
  steps_per_epoch = TRAIN_EXAMPLES // batch
  c = ml_collections.ConfigDict()
  c.method = "av_mae"
  c.seed = 0
  c.total_steps = 120 * steps_per_epoch if official else 300
  c.log_every_steps = 100 if official else 10
  c.checkpoint_every_steps = steps_per_epoch if official else 100
  c.keep_checkpoints = 3
  c.image_every_steps = steps_per_epoch if official else 100
  c.dtype = "bfloat16" if official else "float32"  # compute dtype; parameters float32
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.dcn_mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = cav_mae.SHARDING_RULES
  c.init_checkpoint = ""
  c.aot_executable = ""
  c.keep_period = 0  # the run settings below as configs/cav_mae.py's
  c.profile_steps = ()
  c.compilation_cache_dir = ""
  c.distributed = ml_collections.ConfigDict(dict(
      initialization_timeout_seconds=300, heartbeat_timeout_seconds=100,
      shutdown_timeout_seconds=300))

  audio_frames, mel_bins, image_size, num_frames, stride = INPUT_SIZES[size]
  c.data = data.get_config("")
  c.data.batch_size = batch
  c.data.audio_frames, c.data.image_size = audio_frames, image_size
  c.data.num_frames, c.data.frame_stride = num_frames, stride
  c.data.augment.time_roll = False  # CAV-MAE's; not in the official AV-MAE pipeline

  c.model = ml_collections.ConfigDict(dict(
      audio_frames=audio_frames, mel_bins=mel_bins, image_size=image_size,
      num_frames=num_frames, tubelet_size=2, mlp_ratio=4.0,
      # How the modalities meet (avmae/models/av_mae.py ENCODERS, DECODERS); the released
      # config's: mid fusion (the last fusion_layers joint) and one shared decoder.
      encoder_strategy="separate_encoders_and_concat", decoder_strategy="same_decoder",
      use_inpainting=False,
      remat="none", scan_layers=False,  # as configs/cav_mae.py
      **MODEL_SIZES[size]))
  # mode_v: "unstructured" (random over every video token, official) or "tube" (VideoMAE's:
  # one spatial mask repeated over the time slots; not in the official multimodal model).
  c.masking = ml_collections.ConfigDict(dict(ratio_a=0.7, ratio_v=0.9, mode_v="unstructured"))
  # standardise_per_patch: each target patch minus its mean over its (biased) std + 1e-6
  # inside the root, both modalities (official's option; off in the released configs).
  c.loss = ml_collections.ConfigDict(dict(weight_a=0.5, weight_v=0.5,
                                          standardise_per_patch=False))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-4 * batch / 256 if official else 1e-3,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
      no_decay=("bias", "scale", "mask_token"),  # decay on kernels only, as official
      grad_clip_norm=0.0 if official else 1.0,
      accumulation_steps=1,
      warmup_steps=4 * steps_per_epoch if official else 20,
      schedule="cosine", decay_epochs=(), decay_factor=1.0))
  return c
