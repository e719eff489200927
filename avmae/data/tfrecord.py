"""TFRecord framing with CRC checks, and the sidecar index that makes shards random-access.

A TFRecord file is a sequence of records, each
    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
(little-endian). TensorFlow reads and writes the same bytes; we neither import nor need it.

The index (`<shard>.index`) lists the byte offset of every record so that grain can read
record i with one `pread`. It also stores the shard's size, so an index left over from an
older shard is detected as stale instead of returning garbage.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator

import google_crc32c
import numpy as np

from avmae.data import errors

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of length
_FOOTER = struct.Struct("<I")  # masked crc of data
_OVERHEAD = _HEADER.size + _FOOTER.size
INDEX_SUFFIX = ".index"
_INDEX_MAGIC = b"AVMIDX01"
_INDEX_HEADER = struct.Struct("<8sQQ")  # magic, shard size in bytes, number of records


def masked_crc32c(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """Returns `data` framed as one TFRecord (header, data, footer)."""
  length = struct.pack("<Q", len(data))
  return b"".join((length, struct.pack("<I", masked_crc32c(length)), data,
                   _FOOTER.pack(masked_crc32c(data))))


def unframe_record(framed: bytes, where: str) -> bytes:
  """Checks the framing and both CRCs of one record; returns its data.

  `where` names the file and record for the error message.
  """
  if len(framed) < _OVERHEAD:
    raise errors.CorruptRecordError(f"{where}: record is {len(framed)} bytes, shorter than its "
                                    f"{_OVERHEAD}-byte framing")
  length, length_crc = _HEADER.unpack_from(framed)
  if masked_crc32c(framed[:8]) != length_crc:
    raise errors.CorruptRecordError(f"{where}: CRC mismatch in the length header")
  if length != len(framed) - _OVERHEAD:
    raise errors.StaleIndexError(
        f"{where}: the header says {length} bytes but the index gives "
        f"{len(framed) - _OVERHEAD}; the index does not describe this shard. Rebuild it with "
        "`python -m avmae.data.index <dataset dir>`")
  data = framed[_HEADER.size:_HEADER.size + length]
  (data_crc,) = _FOOTER.unpack_from(framed, _HEADER.size + length)
  if masked_crc32c(data) != data_crc:
    raise errors.CorruptRecordError(f"{where}: CRC mismatch in the record data")
  return data


def scan_offsets(path: str) -> np.ndarray:
  """Walks the record headers of a shard (data is not read) and returns record offsets."""
  size = os.path.getsize(path)
  offsets = []
  with open(path, "rb") as f:
    offset = 0
    while offset < size:
      header = f.read(_HEADER.size)
      where = f"{path} record {len(offsets)} at byte offset {offset}"
      if len(header) < _HEADER.size:
        raise errors.TruncatedShardError(
            f"{where}: the file ends inside a record header ({len(header)} of {_HEADER.size} "
            "bytes). The shard was cut short (interrupted copy or write): rewrite it.")
      length, length_crc = _HEADER.unpack(header)
      if masked_crc32c(header[:8]) != length_crc:
        raise errors.CorruptRecordError(f"{where}: CRC mismatch in the length header; this is "
                                        "not a TFRecord file or it is corrupt.")
      end = offset + _OVERHEAD + length
      if end > size:
        raise errors.TruncatedShardError(
            f"{where}: the record needs bytes up to {end} but the file has {size}. The shard was "
            "cut short (interrupted copy or write): rewrite it.")
      offsets.append(offset)
      offset = end
      f.seek(offset)
  return np.asarray(offsets, dtype=np.int64)


def index_path(shard_path: str) -> str:
  return shard_path + INDEX_SUFFIX


def write_index(shard_path: str, offsets: np.ndarray, size: int | None = None) -> None:
  """Writes the index of `shard_path` (whose size is `size`, default: as on disk)."""
  size = os.path.getsize(shard_path) if size is None else size
  tmp = index_path(shard_path) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(_INDEX_HEADER.pack(_INDEX_MAGIC, size, len(offsets)))
    f.write(np.asarray(offsets, dtype="<i8").tobytes())
  os.replace(tmp, index_path(shard_path))  # readers never see a half-written index


def build_index(shard_path: str) -> np.ndarray:
  offsets = scan_offsets(shard_path)
  write_index(shard_path, offsets)
  return offsets


def read_index(shard_path: str) -> np.ndarray:
  """Returns the record offsets of a shard, plus its size as a final entry.

  Raises MissingIndexError / StaleIndexError with the command that fixes it.
  """
  path = index_path(shard_path)
  fix = f"Rebuild it with `python -m avmae.data.index {os.path.dirname(shard_path) or '.'}`."
  if not os.path.exists(shard_path):
    raise errors.MissingShardError(f"shard {shard_path} does not exist; dataset_info.json lists "
                                   "it. Was the dataset copied completely?")
  if not os.path.exists(path):
    raise errors.MissingIndexError(f"no index {path} for shard {shard_path}. {fix}")
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < _INDEX_HEADER.size:
    raise errors.StaleIndexError(f"index {path} is truncated. {fix}")
  magic, shard_size, count = _INDEX_HEADER.unpack_from(raw)
  if magic != _INDEX_MAGIC or len(raw) != _INDEX_HEADER.size + 8 * count:
    raise errors.StaleIndexError(f"index {path} is not an avmae index or is damaged. {fix}")
  actual = os.path.getsize(shard_path)
  if actual != shard_size:
    raise errors.StaleIndexError(
        f"index {path} is stale: it was built for a shard of {shard_size} bytes, but "
        f"{shard_path} has {actual} bytes. {fix}")
  offsets = np.frombuffer(raw, dtype="<i8", offset=_INDEX_HEADER.size)
  return np.append(offsets, shard_size).astype(np.int64)


def iter_records(path: str) -> Iterator[bytes]:
  """Sequentially yields the checked data of every record in a shard (no index needed)."""
  offsets = np.append(scan_offsets(path), os.path.getsize(path))
  with open(path, "rb") as f:
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
      f.seek(start)
      yield unframe_record(f.read(end - start), f"{path} record {i} at byte offset {start}")


class RecordWriter:
  """Appends framed records to one shard and remembers their offsets for the index.

  Records go to `<path>.tmp`; `close` writes the index and then renames the shard into
  place, so a killed writer never leaves a shard under its final name that looks complete.
  """

  def __init__(self, path: str):
    self.path = path
    self._tmp = path + ".tmp"
    self._file: BinaryIO = open(self._tmp, "wb")
    self._offsets: list[int] = []
    self._position = 0

  def write(self, data: bytes) -> None:
    framed = frame_record(data)
    self._offsets.append(self._position)
    self._file.write(framed)
    self._position += len(framed)

  def __len__(self) -> int:
    return len(self._offsets)

  def close(self) -> None:
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    write_index(self.path, np.asarray(self._offsets, dtype=np.int64), self._position)
    os.replace(self._tmp, self.path)
