"""Paths of what runs write and read: local or on a bucket (`gs://...`), through etils.epath.

Every workdir file (config, run info, metrics, pictures, probe results, exports) goes through
`path`; orbax writes checkpoints to the same places itself.
"""

from __future__ import annotations

import os

from etils import epath

# With TensorFlow installed, epath would reach buckets through tf.io.gfile, importing
# TensorFlow into training; fsspec (gcsfs) instead. Orbax's own epath calls follow this too.
os.environ.setdefault("EPATH_USE_TF", "0")

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: a URI as it is, a local path made absolute (orbax needs that)."""
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.abspath(s))


def write(p: PathLike, data: str | bytes) -> None:
  """Writes the whole file so that readers see the old or the new content, never a part:
  locally through a temporary file renamed over it; a bucket's objects appear whole."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  out = target if is_remote(target) else target.with_name(target.name + ".tmp")
  if isinstance(data, str):
    out.write_text(data)
  else:
    out.write_bytes(data)
  if out != target:
    out.replace(target)
