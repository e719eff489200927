"""Clip lists in the formats of AudioSet, VGGSound, CAV-MAE and plain CSVs, read into one form.

load_manifest(path, media_root) finds each clip's media file in an index of media_root built once
(file stem -> path; among files sharing a stem, the earlier extension in MEDIA_EXTENSIONS wins, so
video beats audio, then the first path in sort order):
- audioset (YTID, start, end): stem "{YTID}_{start in ms}" or "{YTID}_{start:.1f}" is the cut
  segment (the whole file: start/end None); else stem "{YTID}" is the video, cut at [start, end).
- vggsound (ytid, start): stem "{ytid}_{start:06d}" or "{ytid}_{start}" is the 10 s cut; else
  stem "{ytid}" is the video, cut at [start, start + 10).
- cavmae (video_id): stem "{video_id}", else the only stem "{video_id}_<number>" (the ids carry no
  start time); else the entry's "wav" if that file exists, audio only: CAV-MAE kept extracted
  audio and frame folders, not the videos.
- plain (header path,labels[,start,end,clip_id,split]): the path; relative ones under media_root.
load_media_dir(dir) lists a folder tree whose folder names are the labels. Rows that cannot be
used are kept in Manifest.problems with their line and reason, never dropped silently.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator

MEDIA_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4a", ".wav", ".flac", ".mp3",
                    ".ogg")
VGGSOUND_SECONDS = 10
PLAIN_COLUMNS = ("path", "labels", "start", "end", "clip_id", "split")
_MID_FORMATS = ("audioset", "cavmae")  # labels are ontology MIDs, named by label_csv
_SPLIT_FORMATS = ("plain", "vggsound")  # the others have no split to filter by
_NUMBER = re.compile(r"\d+\.?\d*|\.\d+").fullmatch  # seconds: no sign, exponent, nan or inf


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
  """Clips sorted by clip_id; problems {"line", "row", "reason"} in file order ("line" is the
  entry number in a CAV-MAE data list, None for load_media_dir)."""
  clips: tuple[ClipSpec, ...]
  label_names: tuple[str, ...]
  problems: tuple[dict, ...]


class _RowError(ValueError):
  """A row that cannot be used; the message is its reason in Manifest.problems."""


_Record = tuple[int | None, str, Any]  # (line, raw text, parsed row)


def _collect(records: Iterable[_Record], parse: Callable[[Any], ClipSpec | None],
             label_names: Iterable[str]) -> Manifest:
  """Parses each record; of the rows with one clip id, the first usable one wins."""
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
      if clip is not None:
        clips[clip.clip_id] = clip
  return Manifest(tuple(clips[k] for k in sorted(clips)), tuple(label_names), tuple(problems))


def _rows(path: str, comments: bool = False) -> Iterator[_Record]:
  """Non-blank CSV rows (fields stripped) with their first line and text; with comments, lines
  starting with '#' are skipped."""
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
  if not _NUMBER(text):  # a regex, as float() also takes "nan", "-1" and "1e9"
    raise _RowError(f"bad {what} {text!r}")
  return float(text)


def _segment(start: str, end: str, required: bool = False) -> tuple[float | None, float | None]:
  """Start and end seconds; an empty one is open (None) unless required."""
  s = _number(start, "start") if start or required else None
  e = _number(end, "end") if end or required else None
  if e is not None and e <= (s or 0.0):
    raise _RowError(f"end {e:g} <= start {s or 0.0:g}")
  return s, e


def _media_files(root: str) -> list[str]:
  """Sorted paths, relative to root, of the media files under it."""
  return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root)
                for n in names if os.path.splitext(n)[1].lower() in MEDIA_EXTENSIONS)


def _media_index(root: str) -> dict[str, str]:
  """File stem -> absolute path of the media files under root."""
  index: dict[str, str] = {}
  for rel in sorted(_media_files(root),
                    key=lambda r: (MEDIA_EXTENSIONS.index(os.path.splitext(r)[1].lower()), r)):
    index.setdefault(os.path.splitext(os.path.basename(rel))[0], os.path.join(root, rel))
  return {stem: os.path.abspath(p) for stem, p in index.items()}


def _find(index: dict[str, str], cut_stems: list[str], whole_stem: str) -> tuple[str, bool]:
  """The file of the first cut-segment stem, else of the whole video's; and whether it is cut."""
  found = [(index[s], s != whole_stem) for s in (*cut_stems, whole_stem) if s in index]
  if not found:
    raise _RowError("missing media")
  return found[0]


def _clip_id(file: str, root: str) -> str:
  """Path relative to root (absolute when outside it) without extension, '/'-separated."""
  rel = os.path.relpath(file, os.path.abspath(root))
  rel = file if rel.split(os.sep)[0] == os.pardir else rel
  return os.path.splitext(rel)[0].replace(os.sep, "/")


def load_label_csv(path: str) -> tuple[tuple[str, ...], dict[str, int]]:
  """AudioSet class_labels_indices.csv (index,mid,display_name) -> (names by index, mid -> id)."""
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.DictReader(f, skipinitialspace=True))
  try:
    by_index = {int(r["index"]): (r["mid"].strip(), r["display_name"].strip()) for r in rows}
  except (KeyError, AttributeError, ValueError):
    raise ValueError(f"{path}: expected rows index,mid,display_name after a header") from None
  mids = {mid: i for i, (mid, _) in by_index.items()}
  if sorted(by_index) != list(range(len(rows))) or len(mids) != len(rows):
    raise ValueError(f"{path}: indices must be 0..{len(rows) - 1} and mids unique")
  return tuple(by_index[i][1] for i in range(len(rows))), mids


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
  ids, index = {n: i for i, n in enumerate(names)}, _media_index(media_root)

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
  cut: dict[str, list[str]] = {}  # files of stems "{video_id}_<number>", by video_id
  for stem, file in sorted(index.items()):
    if match := re.fullmatch(r"(.+)_\d+(\.\d+)?", stem):
      cut.setdefault(match.group(1), []).append(file)

  def parse(entry: Any) -> ClipSpec:
    vid, labels, wav = (entry.get(k) for k in ("video_id", "labels", "wav"))
    if not (vid and isinstance(vid, str) and isinstance(labels, str)):
      raise _RowError("expected video_id and labels strings")
    label_ids = _mid_labels(labels, ids)
    found = [index[vid]] if vid in index else cut.get(vid, [])
    if len(found) > 1:
      raise _RowError("ambiguous media: " + ", ".join(found))
    if not found and isinstance(wav, str) and wav:
      found = [os.path.abspath(os.path.join(media_root, wav))]  # join keeps absolute paths
    if not found or not os.path.isfile(found[0]):
      raise _RowError("missing media")
    return ClipSpec(vid, found[0], None, None, label_ids)

  entries = enumerate(data["data"], start=1)
  return _collect(((n, json.dumps(e, sort_keys=True), e if isinstance(e, dict) else {})
                   for n, e in entries), parse, names)


def _plain(path: str, media_root: str, label_csv: str, split: str | None) -> Manifest:
  records = list(_rows(path))
  header = [c.lower() for c in records[0][2]] if records else []
  if ({"path", "labels"} - set(header) or set(header) - set(PLAIN_COLUMNS)
      or len(set(header)) != len(header)):
    raise ValueError(f"{path}: header {header} must name path,labels and optionally "
                     f"{','.join(PLAIN_COLUMNS[2:])}, each once")
  if split is not None and "split" not in header:
    raise ValueError(f"{path}: no split column to filter by split={split!r}")
  rows = [(line, raw, dict(zip(header, f)) if len(f) == len(header) else f)
          for line, raw, f in records[1:]]

  def label_names(row: dict[str, str]) -> set[str]:
    return {n.strip() for n in re.split(r"[;|]", row["labels"]) if n.strip()}

  names = sorted(set().union(*(label_names(r) for _, _, r in rows if isinstance(r, dict))))
  ids = {name: i for i, name in enumerate(names)}

  def parse(row: dict[str, str] | list[str]) -> ClipSpec | None:
    if isinstance(row, list):
      _check_fields(row, len(header))
    if split is not None and row["split"] != split:
      return None
    if not row["path"]:
      raise _RowError("empty path")
    start, end = _segment(row.get("start", ""), row.get("end", ""))
    file = os.path.abspath(os.path.join(media_root, row["path"]))  # join keeps absolute paths
    if not os.path.isfile(file):
      raise _RowError("missing media")
    labels = tuple(sorted(ids[n] for n in label_names(row)))
    clip_id = row.get("clip_id") or _clip_id(file, media_root)
    return ClipSpec(clip_id, file, start, end, labels, row.get("split") or None)

  return _collect(rows, parse, names)


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
    "audioset": _audioset, "cavmae": _cavmae, "plain": _plain, "vggsound": _vggsound,
    "media_dir": lambda path, media_root, label_csv, split: load_media_dir(path)}
FORMATS = tuple(sorted(_PARSERS))  # load_manifest also takes "auto"
# A CSV's format from its first row (raw text, fields): the first that matches.
_DETECTORS: dict[str, Callable[[str, list[str]], bool]] = {
    "plain": lambda raw, f: {"path", "labels"} <= {c.lower() for c in f},
    "audioset": lambda raw, f: raw.startswith("#") or (
        len(f) == 4 and bool(_NUMBER(f[1]) and _NUMBER(f[2]))),
    "vggsound": lambda raw, f: len(f) == 4 and bool(_NUMBER(f[1])),
}


def detect_format(path: str) -> str:
  """A folder is media_dir, a .json file cavmae, a CSV is told by its first row."""
  if os.path.isdir(path):
    return "media_dir"
  if path.lower().endswith(".json"):
    return "cavmae"
  _, raw, fields = next(_rows(path), (None, "", []))
  found = [name for name, matches in _DETECTORS.items() if matches(raw, fields)]
  if not found:
    raise ValueError(f"{path}: cannot tell the manifest format; pass format= one of "
                     f"{', '.join(FORMATS)}")
  return found[0]


def load_manifest(path: str, media_root: str | None, format: str = "auto",
                  label_csv: str | None = None, split: str | None = None) -> Manifest:
  """Reads a clip list (format: "auto" or one of FORMATS); media files are under media_root."""
  if format not in ("auto", *FORMATS):
    raise ValueError(f"unknown manifest format {format!r}; valid: auto, {', '.join(FORMATS)}")
  fmt = detect_format(path) if format == "auto" else format
  # Arguments that a format cannot use are errors, not silently ignored.
  if (label_csv is None) == (fmt in _MID_FORMATS):
    raise ValueError(f"label_csv (class_labels_indices.csv) is needed by, and only by, formats "
                     f"{', '.join(_MID_FORMATS)}; this is {fmt}")
  if split is not None and fmt not in _SPLIT_FORMATS:
    raise ValueError(f"format {fmt} has no splits to filter by split={split!r}")
  if fmt != "media_dir" and not (media_root and os.path.isdir(media_root)):
    raise ValueError(f"media_root {media_root!r} is not a directory")
  return _PARSERS[fmt](path, media_root, label_csv, split)
