"""The input pipeline: indexed TFRecords -> grain -> global, sharded `jax.Array` batches.

    indexed records (random access) -> permutation per epoch by seed -> the rows of each
    global batch that this process's devices hold -> prepare (parse, pick frames, crop/pad,
    normalise, augment) and stack, one batch per grain worker task
    -> each device's rows placed on it -> one global jax.Array of the global shape

With a mesh, a process reads exactly the rows that the batch sharding puts on its devices
(`addressable_devices_indices_map`), so any mesh layout is right: where a mesh axis outside
`data.batch_axes` (e.g. `tensor`) spans processes, every replica gets the same rows. Row r of
global batch j is position j*G + r of the record stream, prepared with an RNG of (seed,
position): the same numbers on any process count, mesh or worker count. The global batches
walk through one permutation of the records per epoch, so an epoch covers every record
exactly once. No TensorFlow or torch here.

Batches are dicts:
  audio          float32 [B, audio_frames, mel_bins]   normalised log-mel (with a mesh and
                 data.audio_on_device, BatchSource's batches hold it float16 as stored,
                 cropped or padded, with "audio_roll" [B]: finished on the devices, finish.py)
  frames         uint8   [B, H, W, 3] (or a clip [B, T, H, W, 3] with num_frames T > 1, or
                 [B, N, H, W, 3] with all_frames) RGB; normalised
                 on the device (augment.normalize_image), a quarter of float32's bytes.
                 Absent with data.num_frames=0 (audio only: no frame is decoded)
  labels         float32 [B, num_classes]              multi-hot
  record_index   int32   [B]                           global record number in the split
  valid          bool    [B]                           False for padding / skipped records
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
from typing import Any, Iterator, NamedTuple, Sequence

import grain
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avmae import sharding
from avmae.data import augment, dataset_info, errors, finish, schema
from avmae.data.source import RawRecord, TFRecordSource


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Everything `prepare_example` needs, as plain values (it is pickled to grain workers)."""
  audio_frames: int
  mel_bins: int
  frame_size: tuple[int, int]
  image_size: tuple[int, int]
  frames_per_clip: int
  log_mel_mean: float
  log_mel_std: float
  num_classes: int
  train: bool
  all_frames: bool
  num_frames: int  # frames of a clip (1: one frame, [H, W, 3]; 0: audio only, no frames)
  frame_stride: int
  time_roll: bool
  roll_gain: bool
  noise: float
  freq_mask: int
  time_mask: int
  random_resized_crop: bool
  crop_scale: tuple[float, float]
  flip: bool
  skip_corrupt: bool
  audio_on_device: bool

  @property
  def reads_frames(self) -> bool:
    """False for audio-only examples (data.num_frames=0): they have no "frames"."""
    return self.all_frames or self.num_frames > 0

  @property
  def audio_on_host(self) -> bool:
    """True: examples carry finished float32 audio. Noise (per-element numbers from the
    record's RNG), roll + gain (before the crop) and SpecAugment keep the host path."""
    return not self.audio_on_device or self.train and (
        self.roll_gain or self.noise > 0 or self.freq_mask > 0 or self.time_mask > 0)

  @property
  def rolls(self) -> bool:
    return self.train and self.time_roll


AUDIO_ONLY_HINT = "data.num_frames=0 (with data.all_frames=False) reads audio only"


def _frames_setting(spec: ExampleSpec) -> str:
  return "data.all_frames=True" if spec.all_frames else f"data.num_frames={spec.num_frames}"


def clip_frames(num_frames: int, spec: ExampleSpec, rng: np.random.Generator, where: str
                ) -> np.ndarray:
  """Indices of the frames of an example among a record's `num_frames`: every frame
  (all_frames); or a clip of spec.num_frames, spec.frame_stride apart, starting at random in
  training and centred in evaluation. One frame: official CAV-MAE's random frame in training,
  the middle one (N // 2) in evaluation. Audio-only examples take none."""
  if not spec.reads_frames:
    return np.arange(0)
  if num_frames == 0:
    raise errors.SchemaError(
        f"{where}: the clip has no video (video/frames is empty: built with "
        f"--require_video=false) but {_frames_setting(spec)} needs frames; {AUDIO_ONLY_HINT}")
  if spec.all_frames:
    needed = spec.frames_per_clip
    if num_frames < needed:
      raise errors.SchemaError(f"{where}: record has {num_frames} frames, {needed} needed")
    return np.arange(needed)
  span = (spec.num_frames - 1) * spec.frame_stride + 1
  if span > num_frames:
    raise errors.SchemaError(
        f"{where}: record has {num_frames} frames; data.num_frames={spec.num_frames} at "
        f"data.frame_stride={spec.frame_stride} spans {span}")
  if spec.train:
    start = rng.integers(num_frames - span + 1)
  else:
    start = min(max(num_frames // 2 - span // 2, 0), num_frames - span)
  return start + spec.frame_stride * np.arange(spec.num_frames)


def _prepare_frame(frame: np.ndarray, spec: ExampleSpec, rng: np.random.Generator):
  if spec.train and spec.random_resized_crop:
    frame = augment.random_resized_crop(frame, rng, spec.image_size, spec.crop_scale)
  else:
    frame = augment.resize_bilinear(frame, spec.image_size)
  if spec.train and spec.flip:
    frame = augment.random_flip(frame, rng)
  return augment.to_uint8(frame)


def empty_example(spec: ExampleSpec, record_index: int, num_skipped: int) -> dict[str, Any]:
  """An all-zero, invalid example: a skipped record or padding of the last batch."""
  example = {
      "audio": np.zeros((spec.audio_frames, spec.mel_bins),
                        np.float32 if spec.audio_on_host else np.float16),
      "labels": np.zeros((spec.num_classes,), np.float32),
      "record_index": np.int32(record_index),
      "valid": np.bool_(False),
      "num_skipped": np.int32(num_skipped),
  }
  if spec.reads_frames:
    clip = ((spec.frames_per_clip,) if spec.all_frames else
            (spec.num_frames,) if spec.num_frames > 1 else ())
    example["frames"] = np.zeros(clip + spec.image_size + (3,), np.uint8)
  if not spec.audio_on_host:
    example[finish.ROLL] = np.int32(0)
  return example


def _check_shapes(ex: dict[str, Any], spec: ExampleSpec, where: str) -> None:
  if ex["log_mel"].shape[1] != spec.mel_bins:
    raise errors.SchemaError(f"{where}: record has log-mel {ex['log_mel'].shape}, "
                             f"dataset_info.json says {spec.mel_bins} mel bins")
  if spec.reads_frames and ex["frames"].shape[1:3] != spec.frame_size:
    raise errors.SchemaError(f"{where}: record has frames of {ex['frames'].shape[1:3]}, "
                             f"dataset_info.json says frames of {spec.frame_size}")


def _prepare_audio(log_mel: np.ndarray, spec: ExampleSpec, rng: np.random.Generator
                   ) -> np.ndarray:
  if spec.train and spec.roll_gain:  # on the whole clip, before the crop (as official)
    log_mel = augment.roll_gain(log_mel, rng)
  audio = augment.normalize_log_mel(augment.crop_or_pad(log_mel, spec.audio_frames),
                                    spec.log_mel_mean, spec.log_mel_std)
  if spec.train:  # noise, then the roll: the official dataloader's order (and RNG draws)
    if spec.noise > 0:
      audio = augment.add_noise(audio, rng, spec.noise)
    if spec.time_roll:
      audio = augment.time_roll(audio, rng)
    audio = augment.spec_augment(audio, rng, spec.freq_mask, spec.time_mask)
  return audio


def example_audio(log_mel: np.ndarray, spec: ExampleSpec, rng: np.random.Generator,
                  out: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The example's audio: finished on the host, or as stored (cropped or padded, into `out`
  when given) with its roll's shift, finished on the devices (avmae/data/finish.py)."""
  if spec.audio_on_host:
    return {"audio": _prepare_audio(log_mel, spec, rng)}
  shift = augment.roll_shift(spec.audio_frames, rng) if spec.rolls else 0
  return {"audio": augment.crop_or_pad(log_mel, spec.audio_frames, out),
          finish.ROLL: np.int32(shift)}


def _prepare_frames(decoded: np.ndarray, spec: ExampleSpec, rng: np.random.Generator
                    ) -> np.ndarray:
  if spec.train and len(decoded) > 1:  # one crop and flip for the whole clip
    seed = rng.integers(2**63)
    frames = [_prepare_frame(f, spec, np.random.default_rng(seed)) for f in decoded]
  else:
    frames = [_prepare_frame(f, spec, rng) for f in decoded]
  return np.stack(frames) if spec.all_frames or spec.num_frames > 1 else frames[0]


def _multi_hot(labels: np.ndarray, spec: ExampleSpec, where: str) -> np.ndarray:
  if np.any((labels < 0) | (labels >= spec.num_classes)):
    raise errors.SchemaError(f"{where}: labels {labels.tolist()} outside "
                             f"[0, {spec.num_classes}) of dataset_info.json's label_names")
  hot = np.zeros((spec.num_classes,), np.float32)
  hot[labels] = 1.0
  return hot


def _frames_in_place(spec: ExampleSpec, row: dict[str, np.ndarray]) -> np.ndarray | None:
  """The row's frames as [N, H, W, 3] to decode into, when the frames need no resize, crop
  or flip (e.g. CAV-MAE's 224 px frames stored at 224 px); else None."""
  frames = row.get("frames")
  if frames is None or spec.frame_size != spec.image_size or spec.train and (
      spec.random_resized_crop or spec.flip):
    return None
  return frames if spec.all_frames or spec.num_frames > 1 else frames[None]


def prepare_example(record: RawRecord, rng: np.random.Generator, spec: ExampleSpec,
                    row: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """One record -> one model-ready example (see the module docstring for the fields).

  `row`: views of the example's row of a batch; the frames (when they need no resize, crop
  or flip) are decoded and the unfinished audio written there, saving the batch's copy."""
  index, data, where = record
  if data is None:  # failed its CRC check and skipped by the source
    return empty_example(spec, index, num_skipped=1)
  row = row or {}
  try:
    ex = schema.decode_example(data, where, lambda n: clip_frames(n, spec, rng, where),
                               _frames_in_place(spec, row))
  except errors.CorruptRecordError as e:
    if not spec.skip_corrupt:
      raise
    logging.warning("skipping corrupt record: %s", e)
    return empty_example(spec, index, num_skipped=1)
  _check_shapes(ex, spec, where)
  # The RNG is drawn in this order (frames chosen, audio, frame crops) so that batches of
  # a seed stay the same.
  example = example_audio(ex["log_mel"], spec, rng, row.get("audio"))
  if spec.reads_frames:
    example["frames"] = _prepare_frames(ex["frames"], spec, rng)
  return {
      **example,
      "labels": _multi_hot(ex["labels"], spec, where),
      "record_index": np.int32(index),
      "valid": np.bool_(True),
      "num_skipped": np.int32(0),
  }


def example_spec(cfg: ml_collections.ConfigDict, info: dict[str, Any], train: bool
                 ) -> ExampleSpec:
  feats, aug = info["features"], cfg.augment
  mean, std = dataset_info.log_mel_norm(info, cfg.log_mel_norm)
  if cfg.all_frames and cfg.num_frames != 1:
    raise ValueError(f"config.data.all_frames=True takes every frame; it excludes "
                     f"data.num_frames={cfg.num_frames}")
  if cfg.num_frames < 0 or cfg.frame_stride < 1:
    raise ValueError(f"config.data.num_frames={cfg.num_frames} must be at least 0 (0: audio "
                     f"only) and data.frame_stride={cfg.frame_stride} at least 1")
  return ExampleSpec(
      audio_frames=cfg.audio_frames, mel_bins=feats["mel_bins"],
      frame_size=tuple(feats["frame_size"]),
      image_size=(cfg.image_size,) * 2, frames_per_clip=feats["frames_per_clip"],
      log_mel_mean=mean, log_mel_std=std,
      num_classes=len(info["label_names"]), train=train, all_frames=cfg.all_frames,
      num_frames=cfg.num_frames, frame_stride=cfg.frame_stride,
      time_roll=aug.time_roll, roll_gain=aug.roll_gain, noise=aug.noise, freq_mask=aug.freq_mask,
      time_mask=aug.time_mask, random_resized_crop=aug.random_resized_crop,
      crop_scale=tuple(aug.crop_scale), flip=aug.flip, skip_corrupt=cfg.skip_corrupt,
      audio_on_device=cfg.audio_on_device)


def check_video(spec: ExampleSpec, info: dict[str, Any], split: str, data_dir: str) -> None:
  """Fails before any record is read when the config needs frames the dataset's clips lack
  (data_prep.build --require_video=false stores clips without video)."""
  if not spec.reads_frames:
    return
  if not dataset_info.has_video(info):
    raise errors.SchemaError(
        f"{data_dir}: the dataset has no video (built with --require_video=false; 0 frames "
        f"per clip, feature video/frames is empty) but {_frames_setting(spec)} needs frames; "
        f"{AUDIO_ONLY_HINT}")
  missing = dataset_info.num_without_video(info, split)
  if missing:
    raise errors.SchemaError(
        f"{data_dir}: {missing} of {info['splits'][split]['num_examples']} clips of split "
        f"{split!r} have no video (feature video/frames is empty: built with "
        f"--require_video=false) but {_frames_setting(spec)} needs frames in every clip; "
        f"{AUDIO_ONLY_HINT}, or rebuild without the audio-only files")


def open_split(cfg: ml_collections.ConfigDict, split: str, train: bool
               ) -> tuple[TFRecordSource, ExampleSpec]:
  """The records of `split` of the dataset cfg.dir and how to prepare them; a config that
  asks for what the dataset lacks fails here, before reading."""
  info = dataset_info.load(cfg.dir)
  paths = dataset_info.shard_paths(cfg.dir, info, split)  # an unknown split fails first
  spec = example_spec(cfg, info, train)
  check_video(spec, info, split, cfg.dir)
  return TFRecordSource(paths, cfg.skip_corrupt), spec


class BatchSource:
  """The rows of global batch j that this process reads, as a grain random-access source.

  The records form one stream of positions s = 0, 1, 2, ...: in training, epoch s // N is a
  permutation of the N records drawn from (seed, epoch); in evaluation, the records in order
  and then padding. Global batch j is positions [j*G, (j+1)*G); this source reads rows
  `rows` of it (default: process p's contiguous part [p*L, (p+1)*L), L = G / process_count).
  Example s is prepared with an RNG seeded by (seed, s), so batches are identical whatever
  the number of processes or grain workers.
  """

  def __init__(self, records: TFRecordSource, spec: ExampleSpec, seed: int,
               global_batch_size: int, process_index: int = 0, process_count: int = 1,
               rows: Sequence[int] | None = None):
    self._records, self.spec, self._seed = records, spec, seed
    self._global_batch_size = global_batch_size
    if rows is None:
      local = global_batch_size // process_count
      rows = range(process_index * local, (process_index + 1) * local)
    self.rows = [int(r) for r in rows]
    self._permutations: dict[int, np.ndarray] = {}
    # Evaluation: one pass over the records, the last global batch padded.
    self._len = sys.maxsize if spec.train else math.ceil(len(records) / global_batch_size)

  def __len__(self) -> int:
    return self._len

  def __getstate__(self):
    return {**self.__dict__, "_permutations": {}}

  def _record(self, position: int) -> int:
    epoch, index = divmod(position, len(self._records))
    if epoch not in self._permutations:
      self._permutations = {epoch: np.random.default_rng([self._seed, epoch]).permutation(
          len(self._records))}
    return int(self._permutations[epoch][index])

  def _example(self, position: int, row: dict[str, np.ndarray]) -> dict[str, Any]:
    if not self.spec.train and position >= len(self._records):
      return empty_example(self.spec, -1, 0)
    record = self._record(position) if self.spec.train else position
    rng = np.random.default_rng([self._seed, position])  # evaluation draws nothing from it
    return prepare_example(self._records[record], rng, self.spec, row)

  def __getitem__(self, batch: int) -> dict[str, np.ndarray]:
    start = batch * self._global_batch_size
    template = empty_example(self.spec, -1, 0)
    out = {k: np.empty((len(self.rows), *np.shape(v)), np.asarray(v).dtype)
           for k, v in template.items()}
    for i, r in enumerate(self.rows):
      row = {k: out[k][i] for k in ("audio", "frames") if k in out}  # views
      for k, v in self._example(start + r, row).items():
        if not (k in row and np.may_share_memory(v, row[k])):  # not written in place already
          out[k][i] = v
    return out


def first_examples(cfg: ml_collections.ConfigDict, split: str, count: int
                   ) -> dict[str, np.ndarray]:
  """The first `count` examples of `split` as evaluation prepares them, the same on every
  process (e.g. a fixed batch to draw reconstructions of)."""
  records, spec = open_split(cfg, split, train=False)
  batch = BatchSource(records, dataclasses.replace(spec, audio_on_device=False), 0, count)[0]
  del batch["num_skipped"]
  return batch


class Position(NamedTuple):
  """Where a `Batches` stands: the next batch number and the records skipped so far (an int,
  or with a mesh a replicated device scalar: reading it waits only for that batch's count)."""
  next_batch: int
  num_skipped: Any


class Batches:
  """Iterates global batches; `get_state`/`set_state` resume exactly (same next batches).

  With a mesh, every array is a global `jax.Array` of shape [global_batch_size, ...] whose
  batch dimension is split over the mesh's batch axes; each process reads the rows its
  devices hold (any mesh layout over processes). Without one, batches are this process's
  numpy arrays (its contiguous 1/process_count part). Records skipped as corrupt are invalid
  rows (`valid` False); `num_skipped` counts them over the global batches.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, split: str, *, train: bool, seed: int,
               global_batch_size: int, mesh: jax.sharding.Mesh | None = None):
    process_count = jax.process_count()
    rows = None
    self._sharding = None
    if mesh is not None:
      self._sharding = sharding.batch_sharding(mesh, cfg.batch_axes)
      shards = sharding.num_batch_shards(mesh, cfg.batch_axes)
      if global_batch_size % shards:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the {shards} "
                         f"devices along the mesh's batch axes {tuple(cfg.batch_axes)}")
      rows, self._devices, self._slices = _device_rows(self._sharding, global_batch_size)
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self._count = jax.jit(lambda total, x: total + jnp.sum(x, dtype=jnp.int32),
                            out_shardings=replicated)
      self._replicated = replicated
    elif global_batch_size % process_count:
      raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                       f"{process_count} processes")
    records, spec = open_split(cfg, split, train)
    if mesh is None:  # numpy batches: finished on the host
      spec = dataclasses.replace(spec, audio_on_device=False)
    self.num_records = len(records)
    self.global_batch_size = global_batch_size
    self.source = BatchSource(records, spec, seed, global_batch_size, jax.process_index(),
                              process_count, rows=rows)
    if mesh is not None:  # one call on the sharded batch: the audio finished on its devices
      self._finish = jax.jit(functools.partial(
          finish.finish_audio, mean=spec.log_mel_mean, std=spec.log_mel_std, roll=spec.rolls),
          out_shardings=self._sharding)
    self._num_workers = cfg.num_workers
    # In worker processes the workers are the parallelism; one reader thread each.
    self._read_threads = 1 if cfg.num_workers > 0 else cfg.read_threads
    self._prefetch = cfg.prefetch_batches
    self._iter = None  # made at the first batch, from position `_next`
    self._next = 0
    self._skipped: Any = 0

  def __len__(self) -> int:
    return len(self.source)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def _start(self) -> grain.DatasetIterator:
    # One source element is a whole batch: a few threads and a few batches in flight per
    # process (grain's defaults, 16 threads and 500 elements, hold gigabytes at base shapes).
    ds = grain.MapDataset.source(self.source)[self._next:].to_iter_dataset(
        grain.ReadOptions(num_threads=self._read_threads, prefetch_buffer_size=self._prefetch))
    if self._num_workers > 0:
      if not flags.FLAGS.is_parsed():  # grain reads absl flags; programs without absl.app
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._num_workers, per_worker_buffer_size=self._prefetch))
    return iter(ds)

  def _global(self, x: np.ndarray) -> jax.Array:
    """This process's rows -> the global array: each device gets its rows of `x`."""
    shards = jax.device_put([x[lo:hi] for lo, hi in self._slices], self._devices)
    return jax.make_array_from_single_device_arrays(
        (self.global_batch_size, *x.shape[1:]), self._sharding, shards)

  def __next__(self) -> dict[str, Any]:
    if self._iter is None:
      self._iter = self._start()
    batch = next(self._iter)
    self._next += 1
    skipped = batch.pop("num_skipped")
    if self._sharding is None:
      self._skipped += int(skipped.sum())
      return batch
    if isinstance(self._skipped, int):
      self._skipped = jax.make_array_from_callback((), self._replicated,
                                                   lambda _, n=self._skipped: np.int32(n))
    # Summed on the devices: every process learns the global count without waiting here.
    self._skipped = self._count(self._skipped, self._global(skipped))
    batch = {k: self._global(v) for k, v in batch.items()}
    if finish.ROLL in batch:
      batch["audio"] = self._finish(batch["audio"], batch.pop(finish.ROLL), batch["valid"])
    return batch

  @property
  def num_skipped(self) -> int:
    """Records skipped as corrupt in the global batches read so far."""
    return int(self._skipped)

  def close(self) -> None:
    """Stops grain's worker processes and frees their shared memory."""
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()
    self._iter = None

  def __enter__(self) -> "Batches":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def position(self) -> Position:
    """Where the iterator stands, without waiting for anything (`get_state(position)` later
    encodes it: e.g. the state before a batch that was read ahead)."""
    return Position(self._next, self._skipped)

  def get_state(self, position: Position | None = None) -> bytes:
    """JSON bytes of the iterator state (now, or at `position`): the next global batch
    number and the global skip count.

    Batch j and the count do not depend on the number of processes, workers or the mesh, so
    a state restores exactly into a pipeline with other worker or process counts too.
    """
    next_batch, skipped = position or self.position()
    return json.dumps({"next_batch": next_batch, "num_skipped": int(skipped)}).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state)
    self.close()
    self._next, self._skipped = state["next_batch"], int(state["num_skipped"])


def _device_rows(batch_sharding: jax.sharding.Sharding, global_batch_size: int
                 ) -> tuple[list[int], list[jax.Device], list[tuple[int, int]]]:
  """(rows of the global batch this process reads, its devices, each device's [lo, hi) in
  those rows), from the sharding's own index map: a device's rows are whatever the sharding
  places on it, so replicas across processes (a mesh axis outside the batch axes that spans
  processes) read the same rows."""
  index_map = batch_sharding.addressable_devices_indices_map((global_batch_size,))
  spans = {d: range(global_batch_size)[idx[0]] for d, idx in index_map.items()}
  rows = sorted({r for span in spans.values() for r in span})
  where = {r: i for i, r in enumerate(rows)}
  slices = [(where[s[0]], where[s[0]] + len(s)) if len(s) else (0, 0) for s in spans.values()]
  return rows, list(spans), slices
