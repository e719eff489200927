"""The record schema (version 1): one `tf.train.Example` per clip, parsed without TensorFlow.

Features of every record (documented for users in docs/data_format.md):

| key                | kind        | contents                                               |
|--------------------|-------------|--------------------------------------------------------|
| `schema_version`   | int64 [1]   | SCHEMA_VERSION                                         |
| `clip_id`          | bytes [1]   | unique id of the clip within the dataset (UTF-8)       |
| `source`           | bytes [1]   | where the clip came from (video path, "synthetic")     |
| `labels`           | int64 [L]   | class ids, L >= 0 (multi-label allowed)                |
| `audio/log_mel`    | bytes [1]   | float16 little-endian log-mel, C order [frames, mel]   |
| `audio/shape`      | int64 [2]   | frames, mel bins                                       |
| `video/frames`     | bytes [N]   | N JPEG images (or raw uint8 HxWx3 when encoding="raw") |
| `video/encoding`   | bytes [1]   | "jpeg" or "raw"                                        |
| `video/shape`      | int64 [4]   | N, height, width, 3                                    |
| `video/timestamps` | float [N]   | seconds from the clip start of each frame              |

The message classes are built from a descriptor here, wire-compatible with
tensorflow/core/example/{example,feature}.proto, in a private pool so that importing
TensorFlow in the same process (tests do) cannot clash with them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import simplejpeg
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from avmae.data import errors

SCHEMA_VERSION = 1
VIDEO_ENCODINGS = ("jpeg", "raw")


def _build_example_class() -> type:
  f = descriptor_pb2.FileDescriptorProto(name="avmae_example.proto", package="avmae.tfexample",
                                         syntax="proto3")
  field = descriptor_pb2.FieldDescriptorProto
  repeated = field.LABEL_REPEATED

  def add(name, *fields):
    m = f.message_type.add(name=name)
    for number, (fname, ftype, type_name) in enumerate(fields, start=1):
      m.field.add(name=fname, number=number, label=repeated, type=ftype, type_name=type_name)
    return m

  add("BytesList", ("value", field.TYPE_BYTES, None))
  add("FloatList", ("value", field.TYPE_FLOAT, None))
  add("Int64List", ("value", field.TYPE_INT64, None))
  feature = f.message_type.add(name="Feature")
  feature.oneof_decl.add(name="kind")
  for number, name in enumerate(("bytes_list", "float_list", "int64_list"), start=1):
    type_name = ".avmae.tfexample." + "".join(p.title() for p in name.split("_"))
    feature.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                      type=field.TYPE_MESSAGE, type_name=type_name, oneof_index=0)
  features = f.message_type.add(name="Features")
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_STRING)
  entry.field.add(name="value", number=2, label=field.LABEL_OPTIONAL, type=field.TYPE_MESSAGE,
                  type_name=".avmae.tfexample.Feature")
  features.field.add(name="feature", number=1, label=repeated, type=field.TYPE_MESSAGE,
                     type_name=".avmae.tfexample.Features.FeatureEntry")
  add("Example", ("features", field.TYPE_MESSAGE, ".avmae.tfexample.Features"))
  f.message_type[-1].field[0].label = field.LABEL_OPTIONAL
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("avmae.tfexample.Example"))


Example = _build_example_class()


def encode_example(*, clip_id: str, source: str, labels: np.ndarray | list[int],
                   log_mel: np.ndarray, frames: np.ndarray, timestamps: np.ndarray,
                   encoding: str = "jpeg", jpeg_quality: int = 90) -> bytes:
  """Serialises one clip. `log_mel` [T, mel] (stored float16), `frames` uint8 [N, H, W, 3]."""
  if encoding not in VIDEO_ENCODINGS:
    raise ValueError(f"video encoding {encoding!r} is not one of {VIDEO_ENCODINGS}")
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"clip {clip_id}: frames must be uint8 [N, H, W, 3], got "
                     f"{frames.dtype} {frames.shape}")
  if len(timestamps) != len(frames):
    raise ValueError(f"clip {clip_id}: {len(frames)} frames but {len(timestamps)} timestamps")
  log_mel = np.asarray(log_mel)
  if log_mel.ndim != 2:
    raise ValueError(f"clip {clip_id}: log_mel must be [frames, mel], got {log_mel.shape}")
  if encoding == "jpeg":
    images = [simplejpeg.encode_jpeg(np.ascontiguousarray(f), quality=jpeg_quality,
                                     colorspace="RGB") for f in frames]
  else:
    images = [np.ascontiguousarray(f).tobytes() for f in frames]
  ex = Example()
  feat = ex.features.feature
  feat["schema_version"].int64_list.value.append(SCHEMA_VERSION)
  feat["clip_id"].bytes_list.value.append(clip_id.encode())
  feat["source"].bytes_list.value.append(source.encode())
  feat["labels"].int64_list.value.extend(int(x) for x in labels)
  feat["audio/log_mel"].bytes_list.value.append(log_mel.astype("<f2").tobytes())
  feat["audio/shape"].int64_list.value.extend(log_mel.shape)
  feat["video/frames"].bytes_list.value.extend(images)
  feat["video/encoding"].bytes_list.value.append(encoding.encode())
  feat["video/shape"].int64_list.value.extend(frames.shape)
  feat["video/timestamps"].float_list.value.extend(float(t) for t in timestamps)
  return ex.SerializeToString(deterministic=True)  # map order must not vary by process


def _get(feat, key: str, kind: str, where: str):
  if key not in feat:
    raise errors.SchemaError(f"{where}: feature {key!r} is missing (schema version "
                             f"{SCHEMA_VERSION} requires it)")
  return getattr(feat[key], kind).value


def decode_example(data: bytes, where: str,
                   choose_frames: Callable[[int], np.ndarray] | None = None,
                   frames_out: np.ndarray | None = None) -> dict[str, Any]:
  """Parses one record into numpy arrays.

  Only the frames whose indices `choose_frames(num_frames)` returns are decoded (all when
  None), since JPEG decoding dominates the cost of reading a record. "frames" is uint8
  [N, H, W, 3], N = 0 for a clip stored without video (data_prep.build --require_video=false).
  Frames of `frames_out`'s [H, W, 3] are decoded into it (a batch's row: no copy) and
  "frames" is then `frames_out`.

  Raises CorruptRecordError when the bytes do not parse and SchemaError when a feature is
  missing or inconsistent; `where` names the file and record in the message.
  """
  ex = Example()
  try:
    ex.ParseFromString(data)
  except Exception as e:  # the protobuf runtime raises DecodeError; upb may raise others
    raise errors.CorruptRecordError(f"{where}: not a valid tf.train.Example ({e})") from e
  feat = ex.features.feature
  version = _get(feat, "schema_version", "int64_list", where)
  if list(version) != [SCHEMA_VERSION]:
    raise errors.SchemaError(f"{where}: record has schema version {list(version)}, this code "
                             f"reads version {SCHEMA_VERSION}; regenerate the dataset")
  mel_shape = tuple(_get(feat, "audio/shape", "int64_list", where))
  (mel_bytes,) = _get(feat, "audio/log_mel", "bytes_list", where)
  if len(mel_shape) != 2 or len(mel_bytes) != 2 * int(np.prod(mel_shape)):
    raise errors.SchemaError(f"{where}: audio/log_mel has {len(mel_bytes)} bytes, which does "
                             f"not fit audio/shape {mel_shape} as float16")
  video_shape = tuple(_get(feat, "video/shape", "int64_list", where))
  images = _get(feat, "video/frames", "bytes_list", where)
  timestamps = np.asarray(_get(feat, "video/timestamps", "float_list", where), np.float32)
  if len(video_shape) != 4 or len(images) != video_shape[0] or len(timestamps) != len(images):
    raise errors.SchemaError(f"{where}: video/shape {video_shape}, {len(images)} frames and "
                             f"{len(timestamps)} timestamps disagree")
  (encoding,) = _get(feat, "video/encoding", "bytes_list", where)
  indices = np.arange(len(images)) if choose_frames is None else choose_frames(len(images))
  out = [None] * len(indices)
  if frames_out is not None and len(frames_out) == len(indices):
    out = list(frames_out)
  frames = [_decode_frame(images[i], encoding, video_shape[1:], where, o)
            for i, o in zip(indices, out)]
  # No frames (an audio-only clip, or none chosen) still gives [0, H, W, 3]; one, a view.
  if frames and all(f is o for f, o in zip(frames, out)):
    frames = frames_out
  else:
    frames = (frames[0][None] if len(frames) == 1 else np.stack(frames) if frames else
              np.zeros((0, *video_shape[1:]), np.uint8))
  return {
      "clip_id": _get(feat, "clip_id", "bytes_list", where)[0].decode(),
      "source": _get(feat, "source", "bytes_list", where)[0].decode(),
      "labels": np.asarray(_get(feat, "labels", "int64_list", where), np.int64),
      "log_mel": np.frombuffer(mel_bytes, "<f2").reshape(mel_shape),
      "frames": frames,
      "timestamps": timestamps,
      "frame_indices": indices,
      "num_frames": len(images),
  }


def _decode_frame(image: bytes, encoding: bytes, shape: tuple[int, ...], where: str,
                  out: np.ndarray | None = None) -> np.ndarray:
  """The frame, decoded into `out` (and `out` returned) when it has the frame's shape."""
  if encoding == b"raw":
    if len(image) != int(np.prod(shape)):
      raise errors.SchemaError(f"{where}: raw frame of {len(image)} bytes does not fit {shape}")
    frame = np.frombuffer(image, np.uint8).reshape(shape)
    if out is None or out.shape != tuple(shape):
      return frame
    out[...] = frame
    return out
  if encoding != b"jpeg":
    raise errors.SchemaError(f"{where}: video/encoding {encoding!r} is not one of "
                             f"{VIDEO_ENCODINGS}")
  try:
    if (out is not None and out.shape == tuple(shape)
        and (*simplejpeg.decode_jpeg_header(image)[:2], 3) == out.shape):
      simplejpeg.decode_jpeg(image, colorspace="RGB", buffer=out)
      return out
    frame = simplejpeg.decode_jpeg(image, colorspace="RGB")
  except ValueError as e:
    raise errors.CorruptRecordError(f"{where}: a JPEG frame does not decode ({e})") from e
  if frame.shape != tuple(shape):
    raise errors.SchemaError(f"{where}: decoded frame is {frame.shape}, video/shape says "
                             f"{tuple(shape)}")
  return frame
