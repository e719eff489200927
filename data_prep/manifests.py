"""Clip lists in the formats of AudioSet, VGGSound, CAV-MAE and plain CSVs, read into one form.

load_manifest(path, media_root) reads a list of clips and finds each clip's media file in an index
of media_root (file stem -> path, built once; when several media files share a stem, video beats
audio in MEDIA_EXTENSIONS order, then the first path in sort order):
- audioset (YTID, start, end): stem "{YTID}_{start in ms}" or "{YTID}_{start:.1f}" is the cut
  segment (whole file: start/end None); else stem "{YTID}" is the full video, cut at [start, end).
- vggsound (ytid, start): stem "{ytid}_{start:06d}" or "{ytid}_{start}" is the 10 s cut; else
  stem "{ytid}" is the full video, cut at [start, start + 10).
- cavmae (video_id): stem "{video_id}", else the only stem "{video_id}_<number>" (CAV-MAE ids
  carry no start time); else the entry's "wav" when that file exists. That is audio only: CAV-MAE
  kept extracted audio and frame folders, and the frames cannot be used in place of the video.
- plain (header path,labels[,start,end,clip_id,split]): the path, relative ones under media_root.
load_media_dir(dir) lists a folder tree whose folder names are the labels.
Rows that cannot be used are kept in Manifest.problems with their line and reason, never dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator

MEDIA_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4a", ".wav", ".flac", ".mp3",
                    ".ogg")
VGGSOUND_SECONDS = 10
PLAIN_COLUMNS = ("path", "labels", "start", "end", "clip_id", "split")
_MID_FORMATS = ("audioset", "cavmae")  # labels are ontology MIDs: the vocabulary is label_csv


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """One clip: a media file (absolute path), optionally a segment of it, and its label ids."""
  clip_id: str
  path: str
  start: float | None  # seconds into the file; None = from the beginning
  end: float | None  # None = to the end
  labels: tuple[int, ...]
  split: str | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
  """Clips sorted by clip_id; problems are {"line", "row", "reason"} in file order ("line" is
  the entry number in a CAV-MAE JSON's data list, None for load_media_dir)."""
  clips: tuple[ClipSpec, ...]
  label_names: tuple[str, ...]
  problems: tuple[dict, ...]


class _RowError(ValueError):
  """A row that cannot be used; the message is its reason in Manifest.problems."""


Record = tuple[int | None, str, Any]  # (line, raw text, parsed row)


def _collect(records: Iterable[Record], parse: Callable[[Any], ClipSpec | None],
             label_names: Iterable[str]) -> Manifest:
  """Parses each record; of rows with one clip id, the first usable one wins."""
  clips: dict[str, ClipSpec] = {}
  problems = []
  for line, raw, row in records:
    try:
      clip = parse(row)  # None: left out on purpose (split filter)
      if clip is not None and clip.clip_id in clips:
        raise _RowError("duplicate clip id")
    except _RowError as e:
      problems.append({"line": line, "row": raw, "reason": str(e)})
    else:
      clips.update({clip.clip_id: clip} if clip else {})
  return Manifest(tuple(clips[k] for k in sorted(clips)), tuple(label_names), tuple(problems))


def _rows(path: str, comments: bool = False) -> Iterator[Record]:
  """CSV rows (fields stripped) with the line they start on and their text; blank lines skipped,
  and '#' comment lines when comments is set."""
  with open(path, encoding="utf-8-sig", newline="") as f:
    lines = f.readlines()
  # Comments become blank lines, so reader.line_num still counts the file's lines.
  fed = ("\n" if comments and l.lstrip().startswith("#") else l for l in lines)
  # skipinitialspace: AudioSet writes `id, 30.000, 40.000, "/m/a,/m/b"` (quotes after a space).
  reader = csv.reader(fed, skipinitialspace=True)
  end = 0
  for fields in reader:
    start, end = end + 1, reader.line_num
    if any(c.strip() for c in fields):
      yield start, "".join(lines[start - 1:end]).rstrip("\r\n"), [c.strip() for c in fields]


def _check_fields(fields: list[str], n: int) -> None:
  if len(fields) != n:
    raise _RowError(f"expected {n} fields, got {len(fields)}")


def _number(text: str, what: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value) or value < 0:
    raise _RowError(f"bad {what} {text!r}")
  return value


def _segment(start: str, end: str, required: bool = False) -> tuple[float | None, float | None]:
  """Start and end seconds; an empty one is open (None) unless required."""
  s = _number(start, "start") if start or required else None
  e = _number(end, "end") if end or required else None
  if e is not None and e <= (s or 0.0):
    raise _RowError(f"end {e:g} <= start {s or 0.0:g}")
  return s, e


def _media_files(root: str) -> list[str]:
  """Sorted paths, relative to root, of the media files under it."""
  found = []
  for dirpath, _, filenames in os.walk(root):
    found += [os.path.relpath(os.path.join(dirpath, n), root) for n in filenames
              if os.path.splitext(n)[1].lower() in MEDIA_EXTENSIONS]
  return sorted(found)


def _media_index(root: str) -> dict[str, str]:
  """File stem -> absolute path; for a shared stem the earlier extension in MEDIA_EXTENSIONS."""
  def rank(rel: str) -> tuple[int, str]:
    return MEDIA_EXTENSIONS.index(os.path.splitext(rel)[1].lower()), rel
  index: dict[str, str] = {}
  for rel in sorted(_media_files(root), key=rank):
    stem = os.path.splitext(os.path.basename(rel))[0]
    index.setdefault(stem, os.path.abspath(os.path.join(root, rel)))
  return index


def _find(index: dict[str, str], cut_stems: list[str], whole_stem: str) -> tuple[str, bool]:
  """The first cut-segment stem found, else the whole video's; and whether the file is cut."""
  for stem in cut_stems:
    if stem in index:
      return index[stem], True
  if whole_stem in index:
    return index[whole_stem], False
  raise _RowError("missing media")


def _clip_id(file: str, root: str) -> str:
  """Path relative to root (or absolute, when outside it) without extension, '/'-separated."""
  rel = os.path.relpath(file, os.path.abspath(root))
  rel = file if rel.split(os.sep)[0] == os.pardir else rel
  return os.path.splitext(rel)[0].replace(os.sep, "/")


def load_label_csv(path: str) -> tuple[tuple[str, ...], dict[str, int]]:
  """AudioSet class_labels_indices.csv (index,mid,display_name) -> (names by index, mid -> id)."""
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.DictReader(f, skipinitialspace=True))
  names: dict[int, str] = {}
  ids: dict[str, int] = {}
  for n, row in enumerate(rows, start=1):
    try:
      i, mid, name = int(row["index"]), row["mid"].strip(), row["display_name"].strip()
    except (KeyError, AttributeError, TypeError, ValueError):
      raise ValueError(f"{path}: row {n}: expected index,mid,display_name, got {row}") from None
    if i in names or mid in ids:
      raise ValueError(f"{path}: row {n}: index {i} or mid {mid} repeats")
    names[i], ids[mid] = name, i
  if sorted(names) != list(range(len(names))):
    raise ValueError(f"{path}: indices are not 0..{len(names) - 1}")
  return tuple(names[i] for i in range(len(names))), ids


def _mid_labels(text: str, ids: dict[str, int]) -> tuple[int, ...]:
  mids = [m.strip() for m in text.split(",") if m.strip()]
  unknown = [m for m in mids if m not in ids]
  if unknown:
    raise _RowError("unknown label " + ", ".join(unknown))
  return tuple(sorted({ids[m] for m in mids}))


def _audioset(path: str, media_root: str, label_csv: str, split: str | None) -> Manifest:
  names, ids = load_label_csv(label_csv)
  index = _media_index(media_root)

  def parse(f: list[str]) -> ClipSpec:
    _check_fields(f, 4)
    if not f[0]:
      raise _RowError("empty YTID")
    start, end = _segment(f[1], f[2], required=True)
    labels = _mid_labels(f[3], ids)
    ms = round(start * 1000)  # round, not int: 0.29 * 1000 is 289.99...
    file, cut = _find(index, [f"{f[0]}_{ms}", f"{f[0]}_{start:.1f}"], f[0])
    return ClipSpec(f"{f[0]}_{ms}", file, *((None, None) if cut else (start, end)), labels)

  return _collect(_rows(path, comments=True), parse, names)


def _vggsound(path: str, media_root: str, label_csv: str, split: str | None) -> Manifest:
  records = list(_rows(path))
  # The vocabulary spans the whole file, so every split (and split filter) shares the label ids.
  names = sorted({f[2] for _, _, f in records if len(f) == 4 and f[2]})
  ids = {name: i for i, name in enumerate(names)}
  index = _media_index(media_root)

  def parse(f: list[str]) -> ClipSpec | None:
    _check_fields(f, 4)
    ytid, start_text, label, row_split = f
    if split is not None and row_split != split:
      return None
    if not ytid or not label:
      raise _RowError("empty ytid or label")
    start = _number(start_text, "start")
    if not start.is_integer():  # file names and clip ids hold whole seconds
      raise _RowError(f"start {start_text!r} is not whole seconds")
    s = int(start)
    file, cut = _find(index, [f"{ytid}_{s:06d}", f"{ytid}_{s}"], ytid)
    segment = (None, None) if cut else (float(s), float(s + VGGSOUND_SECONDS))
    return ClipSpec(f"{ytid}_{s:06d}", file, *segment, (ids[label],), row_split or None)

  return _collect(records, parse, names)


def _cavmae(path: str, media_root: str, label_csv: str, split: str | None) -> Manifest:
  names, ids = load_label_csv(label_csv)
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise ValueError(f'{path}: expected {{"data": [...]}} (CAV-MAE format)')
  index = _media_index(media_root)
  cut: dict[str, list[str]] = {}  # "{video_id}_<number>" stems by video_id
  for stem, file in sorted(index.items()):
    match = re.fullmatch(r"(.+)_\d+(\.\d+)?", stem)
    if match:
      cut.setdefault(match.group(1), []).append(file)

  def parse(entry: Any) -> ClipSpec:
    vid = entry.get("video_id") if isinstance(entry, dict) else None
    if not vid or not isinstance(vid, str) or not isinstance(entry.get("labels", ""), str):
      raise _RowError("expected an object with a video_id and labels strings")
    labels = _mid_labels(entry.get("labels", ""), ids)
    found = [index[vid]] if vid in index else cut.get(vid, [])
    wav = entry.get("wav")
    wav = os.path.join(media_root, wav) if wav and isinstance(wav, str) else ""  # keeps absolute
    if len(found) > 1:
      raise _RowError("ambiguous media: " + ", ".join(found))
    if not found and not os.path.isfile(wav):
      raise _RowError("missing media")
    return ClipSpec(vid, found[0] if found else os.path.abspath(wav), None, None, labels)

  return _collect(((n, json.dumps(e, sort_keys=True), e) for n, e in enumerate(data["data"], 1)), parse, names)


def _plain(path: str, media_root: str, label_csv: str, split: str | None) -> Manifest:
  records = list(_rows(path))
  header = [c.lower() for c in records[0][2]] if records else []
  if ({"path", "labels"} - set(header) or set(header) - set(PLAIN_COLUMNS)
      or len(set(header)) != len(header)):
    raise ValueError(f"{path}: header {header} must name path,labels and optionally "
                     f"{','.join(PLAIN_COLUMNS[2:])}, each once")
  if split is not None and "split" not in header:
    raise ValueError(f"{path}: no split column to filter by split={split!r}")

  def label_names(f: list[str]) -> set[str]:
    return {n.strip() for n in re.split(r"[;|]", f[header.index("labels")]) if n.strip()}

  names = sorted(set().union(*(label_names(f) for _, _, f in records[1:] if len(f) == len(header))))
  ids = {name: i for i, name in enumerate(names)}

  def parse(f: list[str]) -> ClipSpec | None:
    _check_fields(f, len(header))
    row = dict(zip(header, f))
    if split is not None and row["split"] != split:
      return None
    if not row["path"]:
      raise _RowError("empty path")
    start, end = _segment(row.get("start", ""), row.get("end", ""))
    file = os.path.abspath(os.path.join(media_root, row["path"]))  # join keeps absolute paths
    if not os.path.isfile(file):
      raise _RowError("missing media")
    labels = tuple(sorted(ids[n] for n in label_names(f)))
    clip_id = row.get("clip_id") or _clip_id(file, media_root)
    return ClipSpec(clip_id, file, start, end, labels, row.get("split") or None)

  return _collect(records[1:], parse, names)


def load_media_dir(media_dir: str) -> Manifest:
  """Every media file under media_dir, labelled by its parent folder's name (none at the top)."""
  if not os.path.isdir(media_dir):
    raise ValueError(f"{media_dir}: not a directory")
  files = _media_files(media_dir)
  names = sorted({os.path.basename(os.path.dirname(r)) for r in files if os.path.dirname(r)})
  ids = {name: i for i, name in enumerate(names)}

  def parse(rel: str) -> ClipSpec:
    parent = os.path.basename(os.path.dirname(rel))
    file = os.path.abspath(os.path.join(media_dir, rel))
    return ClipSpec(_clip_id(file, media_dir), file, None, None, (ids[parent],) if parent else ())

  return _collect(((None, rel.replace(os.sep, "/"), rel) for rel in files), parse, names)


_PARSERS: dict[str, Callable[[str, str, str, str | None], Manifest]] = {
    "audioset": _audioset, "vggsound": _vggsound, "cavmae": _cavmae, "plain": _plain,
    "media_dir": lambda path, media_root, label_csv, split: load_media_dir(path)}
FORMATS = ("auto", *sorted(_PARSERS))
_SPLIT_FORMATS = ("vggsound", "plain")  # the others have no split to filter by


def _is_number(text: str) -> bool:
  try:
    return math.isfinite(float(text))
  except ValueError:
    return False


# First row (raw text, fields) -> format, tried in order.
_DETECTORS: tuple[tuple[str, Callable[[str, list[str]], bool]], ...] = (
    ("plain", lambda raw, f: {"path", "labels"} <= {c.lower() for c in f}),
    ("audioset", lambda raw, f: raw.startswith("#") or (
        len(f) == 4 and _is_number(f[1]) and _is_number(f[2]))),
    ("vggsound", lambda raw, f: len(f) == 4 and _is_number(f[1])),
)


def detect_format(path: str) -> str:
  """The format of a manifest: a folder is media_dir, .json is cavmae, else by the first row."""
  if os.path.isdir(path):
    return "media_dir"
  if path.lower().endswith(".json"):
    return "cavmae"
  _, raw, fields = next(_rows(path), (None, "", []))
  for name, matches in _DETECTORS:
    if matches(raw, fields):
      return name
  raise ValueError(f"{path}: cannot tell the manifest format; pass format= one of "
                   f"{', '.join(FORMATS[1:])}")


def load_manifest(path: str, media_root: str | None, format: str = "auto",
                  label_csv: str | None = None, split: str | None = None) -> Manifest:
  """Reads a clip list (format: one of FORMATS) and finds its media files under media_root."""
  if format not in FORMATS:
    raise ValueError(f"unknown manifest format {format!r}; valid: {', '.join(FORMATS)}")
  fmt = detect_format(path) if format == "auto" else format
  # Arguments a format cannot use are errors, not silently ignored.
  if (label_csv is None) == (fmt in _MID_FORMATS):
    raise ValueError(f"label_csv (class_labels_indices.csv) is needed by, and only by, formats "
                     f"{', '.join(_MID_FORMATS)} (this is {fmt})")
  if split is not None and fmt not in _SPLIT_FORMATS:
    raise ValueError(f"format {fmt} has no splits to filter by split={split!r}")
  if fmt != "media_dir" and not (media_root and os.path.isdir(media_root)):
    raise ValueError(f"media_root {media_root!r} is not a directory")
  return _PARSERS[fmt](path, media_root, label_csv, split)
