"""Audio-MAE pretraining (Huang et al., NeurIPS 2022). `--config=configs/audio_mae.py:SIZE`
with SIZE tiny, small, base or large.

base is the official AudioSet-2M recipe (facebookresearch/AudioMAE
submit_pretrain_audioset2M.sh, main_pretrain.py): `mae_vit_base_patch16`, decoder_mode 1
(16 shifted-window blocks), norm_pix_loss, mask 0.8 unstructured, 1024 x 128 log-mel, global
batch 512 (8 nodes x 8 GPUs x 8), AdamW (0.9, 0.95) with lr 2e-4 * 512 / 256 = 4e-4 and
weight decay 1e-4 on every parameter of two or more dimensions (timm's add_weight_decay: none
on biases, LayerNorms and the Swin temperatures tau; the cls and mask tokens decay), 33
epochs, 3 of them a linear warmup then a half-cosine to 0 (per iteration), no gradient
clipping, roll + gain augmentation (data.augment.roll_gain). Official normalises with
AudioSet's constants, (x + 4.2677393) / (2 * 4.5689974): `--config.data.log_mel_norm=
audioset_audio_mae`; by default the dataset's own mean and std (doubled, as official's)
normalise (configs/data.py LOG_MEL_NORMS). small and large are the official model sizes on
the same recipe.

tiny is the CPU size for tests and the learning check: 128 x 64 log-mel in 8 px patches
(a 16 x 8 grid), a 4-block 64-wide encoder and 4 Swin blocks of 4 heads.
"""

import ml_collections

from configs import cav_mae, data

# Encoder width/depth/heads; decoder width; the global decoder's depth/heads (decoder_mode
# 0: official's decoder_depth 8, decoder_num_heads 16); the Swin decoder's depth/heads
# (decoder_mode 1: official's fixed 16 and 16).
MODEL_SIZES = {
    "tiny": dict(embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2,
                 decoder_num_heads=4, swin_depth=4, swin_heads=4, patch_size=8),
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=512, decoder_depth=8,
                  decoder_num_heads=16, swin_depth=16, swin_heads=16, patch_size=16),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16, swin_depth=16, swin_heads=16, patch_size=16),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                  decoder_depth=8, decoder_num_heads=16, swin_depth=16, swin_heads=16,
                  patch_size=16),
}
INPUT_SIZES = {"tiny": (128, 64), "small": (1024, 128), "base": (1024, 128),
               "large": (1024, 128)}  # (audio frames, mel bins)
CPU_SIZES = ("tiny",)
TRAIN_EXAMPLES = 1_857_210  # AudioSet-2M training clips (as configs/av_mae.py)
RECIPES = {"tiny": {"total_steps": 1000, "checkpoint_every_steps": 250, "keep_checkpoints": 5,
                    "image_every_steps": 250}}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  return cav_mae.sized_config("audio_mae", arg, MODEL_SIZES, _base_config, RECIPES)


def _base_config(size: str) -> ml_collections.ConfigDict:
  official = size not in CPU_SIZES
  batch = 512 if official else 32
  steps_per_epoch = TRAIN_EXAMPLES // batch
  c = ml_collections.ConfigDict()
  c.method = "audio_mae"
  c.seed = 0
  c.total_steps = 33 * steps_per_epoch if official else 300
  c.log_every_steps = 100 if official else 10
  c.checkpoint_every_steps = 4 * steps_per_epoch if official else 100  # official: 4 epochs
  c.keep_checkpoints = 3
  c.image_every_steps = steps_per_epoch if official else 100
  c.dtype = "bfloat16" if official else "float32"  # official trains with fp16 autocast
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

  audio_frames, mel_bins = INPUT_SIZES[size]
  c.data = data.get_config("")
  c.data.batch_size = batch
  c.data.audio_frames = audio_frames
  c.data.num_frames = 0  # audio only: no frames are read
  c.data.log_mel_norm = "dataset_x2"  # official's scale; "audioset_audio_mae": its constants
  c.data.augment.time_roll = False  # CAV-MAE's; Audio-MAE rolls with roll_gain
  c.data.augment.roll_gain = True

  c.model = ml_collections.ConfigDict(dict(
      audio_frames=audio_frames, mel_bins=mel_bins, mlp_ratio=4.0,
      decoder_mode=1,  # 1: shifted-window decoder (official pretraining); 0: global attention
      bias_dropout=0.1,  # official's dropout in the Swin relative position bias MLP
      remat="none", scan_layers=False,  # as configs/cav_mae.py
      **MODEL_SIZES[size]))
  # mode "unstructured": int(L * (1 - ratio)) random tokens stay (official pretraining);
  # "time_freq": official's 2-D masking of whole time rows (mask_t_prob) and frequency
  # columns (mask_f_prob; main_pretrain.py's defaults 0.7 and 0.3).
  c.masking = ml_collections.ConfigDict(dict(ratio=0.8, mode="unstructured", mask_t_prob=0.7,
                                             mask_f_prob=0.3))
  c.loss = ml_collections.ConfigDict(dict(norm_pix=True))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-4 * batch / 256 if official else 1e-3,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4 if official else 0.05,
      no_decay=("bias", "scale", "tau"),  # timm's add_weight_decay: every 1-D parameter
      grad_clip_norm=0.0 if official else 1.0,
      accumulation_steps=1,
      warmup_steps=3 * steps_per_epoch if official else 20,
      schedule="cosine", decay_epochs=(), decay_factor=1.0))
  return c
