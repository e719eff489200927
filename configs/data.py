"""Input pipeline settings, shared by every training and evaluation config."""

import ml_collections

def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: the dataset directory (the one holding dataset_info.json)."""
  c = ml_collections.ConfigDict()
  c.dir = arg
  c.train_split = "train"
  c.eval_split = "eval"
  c.batch_size = 32  # global, over all processes
  c.audio_frames = 128  # log-mel frames after crop/pad (CAV-MAE base: 1024)
  c.image_size = 32  # frames are resized to image_size x image_size (CAV-MAE base: 224)
  c.all_frames = False  # True: every frame of the clip, [N, H, W, 3] per example
  # A clip of num_frames frames, every frame_stride-th of the record's, [T, H, W, 3] per
  # example (1: one frame [H, W, 3], as CAV-MAE): a random start in training, centred in
  # evaluation. 0: audio only, for audio methods or datasets built with
  # --require_video=false: batches have no "frames" and no frame is decoded.
  c.num_frames = 1
  c.frame_stride = 1
  c.num_workers = 0  # grain worker processes; 0 reads in the main process
  c.read_threads = 2  # reader threads when num_workers is 0 (each worker uses one)
  c.prefetch_batches = 4  # batches prepared ahead, per process (or per worker)
  # True: the log-mel travels as stored (float16) and becomes float32, normalised and rolled
  # on the devices (avmae/data/finish.py); False: all on the host (noise, roll + gain and
  # SpecAugment always are).
  c.audio_on_device = True
  c.skip_corrupt = False  # True: skip records that fail their CRC or do not parse, and count
  c.batch_axes = ("data", "fsdp")  # mesh axes the batch dimension is split over
  # How the log-mel is normalised, (x - mean) / std (avmae/data/dataset_info.py
  # LOG_MEL_NORMS): "dataset" (its own statistics), "dataset_x2" (the std doubled, Audio-MAE's
  # scale), "audioset_audio_mae" or "audioset_cav_mae" (the official recipes' constants).
  c.log_mel_norm = "dataset"
  c.augment = ml_collections.ConfigDict()
  c.augment.time_roll = True  # CAV-MAE rolls the spectrogram in time during pretraining
  c.augment.roll_gain = False  # Audio-MAE: roll the whole clip in time, random gain
  c.augment.noise = 0.0  # max scale of added uniform noise (CAV-MAE pretraining: 0.1)
  c.augment.freq_mask = 0  # SpecAugment: widest masked mel band (official finetune: 48)
  c.augment.time_mask = 0  # SpecAugment: widest masked span of frames (official: 192)
  c.augment.random_resized_crop = False
  c.augment.crop_scale = (0.08, 1.0)
  c.augment.flip = False
  return c
