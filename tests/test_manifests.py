"""Manifest parsers: every format into ClipSpecs, media lookup, and every unusable row reported."""

import json
import os

import pytest

from data_prep import manifests
from data_prep.manifests import ClipSpec

MEDIA = ["a/--PJHxphWEs_30000.mp4", "a/-0RWZT-miFs.mkv", "b/-0RWZT-miFs.wav",
         "b/abc_def-123_0.3.wav", "unknownmid1_0.mp4", "vgg/---g-f_I2yQ_000001.mp4",
         "vgg/--0PQM4-hqg_30.mp4", "vgg/--56QUhyDQM.webm", "vid_exact.mp4", "amb_1.mp4",
         "amb_2.mp4", "wavs/other_name.flac", "notes.txt", "a/--PJHxphWEs_30000.json"]

LABEL_CSV = ('index,mid,display_name\n0,/m/09x0r,"Speech"\n'
             '1,/m/05zppz,"Male speech, man speaking"\n2,/m/04rlf,"Music"\n')


def _write(path, text: str, newline: str = "\n") -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline=newline, encoding="utf-8") as f:
    f.write(text)
  return str(path)


@pytest.fixture
def media(tmp_path) -> str:
  """Empty media files under tmp_path/media (lookup needs only their names)."""
  for rel in MEDIA:
    _write(tmp_path / "media" / rel, "")
  return str(tmp_path / "media")


@pytest.fixture
def label_csv(tmp_path) -> str:
  return _write(tmp_path / "class_labels_indices.csv", LABEL_CSV)


def _at(media: str, rel: str) -> str:
  return os.path.join(media, rel)


def _problems(manifest) -> list[tuple]:
  return [(p["line"], p["reason"]) for p in manifest.problems]


def test_audioset(tmp_path, media, label_csv):
  path = _write(tmp_path / "balanced_train_segments.csv", (
      "# Segments csv created Sun Mar  5 10:54:25 2017\n"
      "# num_ytids=9, num_segs=9, num_unique_labels=3, num_positive_labels=10\n"
      "# YTID, start_seconds, end_seconds, positive_labels\n"
      '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/05zppz"\n'
      '-0RWZT-miFs, 420.000, 430.000, "/m/04rlf"\n'
      '\n'
      'abc_def-123, 0.290, 10.290, "/m/04rlf"\n'
      'missing1234, 0.000, 10.000, "/m/09x0r"\n'
      'unknownmid1, 0.000, 10.000, "/m/09x0r,/m/xyz"\n'
      '--PJHxphWEs, 30.000, 40.000, "/m/04rlf"\n'
      'badnumbers1, abc, 10.000, "/m/04rlf"\n'
      'badnumbers2, 20.000, 10.000, "/m/04rlf"\n'
      'badnumbers3, nan, 10.000, "/m/04rlf"\n'
      'short_row, 1.0\n'
      '# a comment with a "quote, and a comma\n'))
  assert manifests.detect_format(path) == "audioset"
  m = manifests.load_manifest(path, media, label_csv=label_csv)
  assert m.label_names == ("Speech", "Male speech, man speaking", "Music")
  assert m.clips == (
      # A cut segment is the whole file; a full video (mkv beats the wav of that stem) is cut.
      ClipSpec("--PJHxphWEs_30000", _at(media, "a/--PJHxphWEs_30000.mp4"), None, None, (0, 1)),
      ClipSpec("-0RWZT-miFs_420000", _at(media, "a/-0RWZT-miFs.mkv"), 420.0, 430.0, (2,)),
      ClipSpec("abc_def-123_290", _at(media, "b/abc_def-123_0.3.wav"), None, None, (2,)))
  assert _problems(m) == [
      (8, "missing media"), (9, "unknown label /m/xyz"), (10, "duplicate clip id"),
      (11, "bad start 'abc'"), (12, "end 10 <= start 20"), (13, "bad start 'nan'"),
      (14, "expected 4 fields, got 2")]
  assert m.problems[0]["row"] == 'missing1234, 0.000, 10.000, "/m/09x0r"'


def test_vggsound_vocabulary_is_the_whole_file_and_split_filters(tmp_path, media):
  path = _write(tmp_path / "vggsound.csv", "\ufeff" + (  # a BOM and CRLF, as Excel writes
      "---g-f_I2yQ,1,people marching,test\n"
      '--0PQM4-hqg,30,"playing drum kit, snare",train\n'
      "--56QUhyDQM,185,waterfall burbling,train\n"
      "missing_vid,0,people marching,train\n"
      "--0PQM4-hqg,30,waterfall burbling,train\n"
      "badstart_vd,1.5,waterfall burbling,test\n"
      "badnum_vid,x,people marching,train\n"), newline="\r\n")
  assert manifests.detect_format(path) == "vggsound"
  names = ("people marching", "playing drum kit, snare", "waterfall burbling")
  first = ClipSpec("---g-f_I2yQ_000001", _at(media, "vgg/---g-f_I2yQ_000001.mp4"), None, None,
                   (0,), "test")
  train = (ClipSpec("--0PQM4-hqg_000030", _at(media, "vgg/--0PQM4-hqg_30.mp4"), None, None,
                    (1,), "train"),
           ClipSpec("--56QUhyDQM_000185", _at(media, "vgg/--56QUhyDQM.webm"), 185.0, 195.0,
                    (2,), "train"))
  everything = manifests.load_manifest(path, media)
  assert everything.label_names == names and everything.clips == (first, *train)
  assert _problems(everything) == [(4, "missing media"), (5, "duplicate clip id"),
                                   (6, "start '1.5' is not whole seconds"), (7, "bad start 'x'")]
  assert everything.problems[1]["row"] == "--0PQM4-hqg,30,waterfall burbling,train"
  only_train = manifests.load_manifest(path, media, "vggsound", split="train")
  assert only_train.label_names == names and only_train.clips == train
  assert _problems(only_train) == [(4, "missing media"), (5, "duplicate clip id"),
                                   (7, "bad start 'x'")]
  only_test = manifests.load_manifest(path, media, split="test")
  assert only_test.label_names == names and only_test.clips == (first,)
  assert _problems(only_test) == [(6, "start '1.5' is not whole seconds")]


def test_cavmae_json(tmp_path, media, label_csv):
  outside = _write(tmp_path / "extracted" / "audio_only.flac", "")
  data = [
      {"video_id": "--PJHxphWEs", "wav": "/gone/--PJHxphWEs.flac", "video_path": "/gone/frames",
       "labels": "/m/09x0r,/m/05zppz"},
      {"video_id": "vid_exact", "wav": "/gone/vid_exact.flac", "labels": "/m/04rlf"},
      {"video_id": "audio_only", "wav": outside, "labels": "/m/04rlf"},
      {"video_id": "rel_wav", "wav": "wavs/other_name.flac", "labels": ""},
      {"video_id": "nothing", "wav": "/gone/nothing.flac", "labels": "/m/04rlf"},
      {"video_id": "vid_exact", "labels": "/m/09x0r"},
      {"video_id": "bad_mid", "labels": "/m/nope,/m/04rlf,/m/gone"},
      {"video_id": "amb", "labels": "/m/04rlf"},
      "not an object",
      {"video_id": "no_labels"}]
  path = _write(tmp_path / "audioset_eval_cav_mae.json", json.dumps({"data": data}, indent=1))
  assert manifests.detect_format(path) == "cavmae"
  m = manifests.load_manifest(path, media, label_csv=label_csv)
  assert m.label_names[1] == "Male speech, man speaking"
  assert m.clips == (
      ClipSpec("--PJHxphWEs", _at(media, "a/--PJHxphWEs_30000.mp4"), None, None, (0, 1)),
      ClipSpec("audio_only", outside, None, None, (2,)),  # no video: the wav, audio only
      ClipSpec("rel_wav", _at(media, "wavs/other_name.flac"), None, None, ()),
      ClipSpec("vid_exact", _at(media, "vid_exact.mp4"), None, None, (2,)))
  reasons = _problems(m)
  assert reasons[:3] == [(5, "missing media"), (6, "duplicate clip id"),
                         (7, "unknown label /m/nope, /m/gone")]
  assert reasons[3][0] == 8 and reasons[3][1].startswith("ambiguous media: ")
  assert reasons[4:] == [(9, "expected video_id and labels strings"),
                        (10, "expected video_id and labels strings")]
  assert json.loads(m.problems[0]["row"])["video_id"] == "nothing"


def test_plain_csv(tmp_path, media):
  outside = _write(tmp_path / "elsewhere" / "clip.mkv", "")
  path = _write(tmp_path / "clips.csv", (
      "path,labels,start,end,split\n"
      "a/--PJHxphWEs_30000.mp4,dog;cat,,,train\n"
      'vid_exact.mp4,"bird|dog, barking",1.5,4,eval\n'
      f"{outside},cat,,,train\n"
      "missing.mp4,cat,,,train\n"
      "./a/--PJHxphWEs_30000.mp4,cat,,,eval\n"
      "vid_exact.mp4,cat,5,2,train\n"
      "x.mp4,cat\n"
      "vid_exact.mp4,,,-1,train\n"))
  assert manifests.detect_format(path) == "plain"
  m = manifests.load_manifest(path, media)
  assert m.label_names == ("bird", "cat", "dog", "dog, barking")
  assert m.clips == (
      ClipSpec(os.path.splitext(outside)[0], outside, None, None, (1,), "train"),
      ClipSpec("a/--PJHxphWEs_30000", _at(media, "a/--PJHxphWEs_30000.mp4"), None, None,
               (1, 2), "train"),
      ClipSpec("vid_exact", _at(media, "vid_exact.mp4"), 1.5, 4.0, (0, 3), "eval"))
  assert _problems(m) == [(5, "missing media"), (6, "duplicate clip id"),
                          (7, "end 2 <= start 5"), (8, "expected 5 fields, got 2"),
                          (9, "bad end '-1'")]
  # Rows left out by the filter take no clip id: line 6 is the first eval row of its clip.
  evals = manifests.load_manifest(path, media, "plain", split="eval")
  assert [c.clip_id for c in evals.clips] == ["a/--PJHxphWEs_30000", "vid_exact"]
  assert evals.label_names == m.label_names
  assert _problems(evals) == [(8, "expected 5 fields, got 2")]


def test_plain_csv_clip_ids_and_unlabelled_clips(tmp_path, media):
  path = _write(tmp_path / "clips.csv", "clip_id,path,labels\nmine,vid_exact.mp4,\n"
                                        ",amb_1.mp4,a | b\n")
  m = manifests.load_manifest(path, media)
  assert m.label_names == ("a", "b") and not m.problems
  assert m.clips == (ClipSpec("amb_1", _at(media, "amb_1.mp4"), None, None, (0, 1)),
                     ClipSpec("mine", _at(media, "vid_exact.mp4"), None, None, ()))
  with pytest.raises(ValueError, match="no split column"):
    manifests.load_manifest(path, media, split="train")
  bad = _write(tmp_path / "bad.csv", "path,labels,duration\nvid_exact.mp4,a,10\n")
  with pytest.raises(ValueError, match="optionally start,end,clip_id,split"):
    manifests.load_manifest(bad, media, "plain")


def test_media_dir(tmp_path):
  root = tmp_path / "clips"
  for rel in ["dogs/x.mp4", "dogs/x.wav", "dogs/readme.txt", "cats/kitten/y.wav", "z.flac",
              "Cats/Y.MP4"]:
    _write(root / rel, "")
  m = manifests.load_media_dir(str(root))
  assert m.label_names == ("Cats", "dogs", "kitten")
  assert m.clips == (ClipSpec("Cats/Y", str(root / "Cats/Y.MP4"), None, None, (0,)),
                     ClipSpec("cats/kitten/y", str(root / "cats/kitten/y.wav"), None, None, (2,)),
                     ClipSpec("dogs/x", str(root / "dogs/x.mp4"), None, None, (1,)),
                     ClipSpec("z", str(root / "z.flac"), None, None, ()))
  assert m.problems == ({"line": None, "row": "dogs/x.wav", "reason": "duplicate clip id"},)
  assert manifests.load_manifest(str(root), None) == m


def test_label_csv_and_argument_errors(tmp_path, media, label_csv):
  names, ids = manifests.load_label_csv(label_csv)
  assert names == ("Speech", "Male speech, man speaking", "Music")
  assert ids == {"/m/09x0r": 0, "/m/05zppz": 1, "/m/04rlf": 2}
  gap = _write(tmp_path / "gap.csv", "index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
  with pytest.raises(ValueError, match="indices must be 0..1"):
    manifests.load_label_csv(gap)
  segments = _write(tmp_path / "segments.csv", '# c\nid1, 0.0, 10.0, "/m/04rlf"\n')
  with pytest.raises(ValueError, match="valid: auto, audioset, cavmae, media_dir, plain, vggsound"):
    manifests.load_manifest(segments, media, "youtube8m", label_csv=label_csv)
  with pytest.raises(ValueError, match="label_csv"):
    manifests.load_manifest(segments, media)
  vgg = _write(tmp_path / "vgg.csv", "id1,0,dog,train\n")
  with pytest.raises(ValueError, match="label_csv"):
    manifests.load_manifest(vgg, media, label_csv=label_csv)
  with pytest.raises(ValueError, match="no splits"):
    manifests.load_manifest(segments, media, label_csv=label_csv, split="train")
  with pytest.raises(ValueError, match="not a directory"):
    manifests.load_manifest(vgg, str(tmp_path / "nowhere"))
  unknown = _write(tmp_path / "odd.csv", "just,some,columns\n")
  with pytest.raises(ValueError, match="cannot tell the manifest format"):
    manifests.load_manifest(unknown, media)
