"""Random-access record source over indexed TFRecord shards (grain's RandomAccessDataSource).

grain ships no random-access TFRecord reader; this one reads record i with a single `pread`
at the offset the sidecar index gives, and verifies both CRCs.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import numpy as np

from avmae.data import errors, tfrecord


class RawRecord(NamedTuple):
  """The checked bytes of one record (None when corrupt and skipped) and where it lives."""
  index: int
  data: bytes | None
  where: str


class TFRecordSource:
  """`len()` and `[i]` over all records of a list of shards, in shard order.

  Picklable: file descriptors are opened lazily in whichever process reads (grain workers).
  With `skip_corrupt`, a record that fails its CRC check comes back with data None
  and is logged; otherwise CorruptRecordError names the shard, record and byte offset.
  """

  def __init__(self, shard_paths: list[str], skip_corrupt: bool = False):
    if not shard_paths:
      raise errors.DataError("TFRecordSource needs at least one shard")
    self._paths = list(shard_paths)
    # offsets[s] has one entry per record plus the shard size, so record r spans
    # offsets[s][r]..offsets[s][r + 1].
    self._offsets = [tfrecord.read_index(p) for p in self._paths]
    counts = np.array([len(o) - 1 for o in self._offsets])
    self._starts = np.concatenate([[0], np.cumsum(counts)])
    self._skip_corrupt = skip_corrupt
    self._fds: dict[int, int] = {}
    self._pid = None

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f"TFRecordSource({len(self._paths)} shards, {len(self)} records)"

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"], state["_pid"] = {}, None
    return state

  def _fd(self, shard: int) -> int:
    if self._pid != os.getpid():  # a fresh (forked or spawned) process: own descriptors
      self._fds, self._pid = {}, os.getpid()
    if shard not in self._fds:
      self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
    return self._fds[shard]

  def locate(self, index: int) -> tuple[int, int]:
    """(shard, record within shard) of global record `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range for {self!r}")
    shard = int(np.searchsorted(self._starts, index, side="right") - 1)
    return shard, index - int(self._starts[shard])

  def __getitem__(self, index: int) -> RawRecord:
    index = int(index)
    shard, record = self.locate(index)
    start, end = self._offsets[shard][record], self._offsets[shard][record + 1]
    where = f"{self._paths[shard]} record {record} at byte offset {start}"
    framed = os.pread(self._fd(shard), int(end - start), int(start))
    try:
      if len(framed) != end - start:
        raise errors.TruncatedShardError(
            f"{where}: read {len(framed)} of {end - start} bytes; the shard is shorter than its "
            "index says. Rewrite the shard and rebuild its index.")
      return RawRecord(index, tfrecord.unframe_record(framed, where), where)
    except errors.CorruptRecordError as e:
      if not self._skip_corrupt:
        raise
      logging.warning("skipping corrupt record: %s", e)
      return RawRecord(index, None, where)
