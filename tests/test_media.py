"""data_prep.media on real files written by PyAV (data_prep/media_factory.py)."""


import av
import numpy as np
import pytest

from avmae.data import features
from data_prep import media_factory as mf
from data_prep import media

RATE = 16000
SIZE = (64, 48)  # width, height of the test videos
STEREO = dict(rate=44100, channels=2, codec="aac")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
  """All media of this module, written once (about 0.5 s)."""
  d = tmp_path_factory.mktemp("media")
  at = lambda name: str(d / name)
  return {
      "h264": mf.write_video(at("h264.mp4"), 3.0, 25, SIZE, "h264", STEREO),
      "mpeg4": mf.write_video(at("mpeg4.mp4"), 3.0, 25, SIZE, "mpeg4",
                              dict(rate=48000, channels=2, codec="aac")),
      "vfr_h264": mf.write_video(at("vfr_h264.mp4"), 3.0, 20, SIZE, "h264",
                                 variable_frame_rate=True),
      "vfr_mpeg4": mf.write_video(at("vfr_mpeg4.mp4"), 3.0, 20, SIZE, "mpeg4",
                                  variable_frame_rate=True),
      "silent": mf.write_video(at("silent.mp4"), 2.0, 25, SIZE, "h264"),
      "wav8k": mf.write_audio(at("mono8k.wav"), 2.0, 8000, 1, "pcm_s16le"),
      "m4a": mf.write_audio(at("stereo.m4a"), 2.0, 22050, 2, "aac"),
      "faststart": mf.write_video(at("faststart.mp4"), 4.0, 25, SIZE, "h264", STEREO,
                                  faststart=True),
      "mpegts": mf.write_video(at("mpegts.ts"), 5.0, 25, SIZE, "h264", STEREO),
      "cover": mf.write_audio(at("cover.mp4"), 2.0, 44100, 2, "aac", cover_art=True),
  }


def path(files, name: str) -> str:
  return files[name]["path"]


def options(**kw) -> media.DecodeOptions:
  return media.DecodeOptions(**{"frame_size": 32, **kw})


def expected_tone(start: float, num_samples: int, channels: int, mono: str) -> np.ndarray:
  """The factory's signal at 16 kHz from `start` (s), reduced to mono like decode_clip."""
  t = start + np.arange(num_samples) / RATE
  waves = mf.tone_amplitude(t) * np.stack([np.sin(2 * np.pi * mf.TONES[c] * t)
                                           for c in range(channels)])
  return waves[0] if mono == "first" else waves.mean(axis=0)


def assert_audio_matches(clip, start: float, channels: int, mono: str) -> None:
  """Same samples as the source (codec noise aside), at the right time: no shift fits better."""
  expected = expected_tone(start, len(clip.waveform), channels, mono)
  inner = slice(RATE // 50, -RATE // 25)  # codec onsets / end padding aside
  errors = {shift: np.sqrt(np.mean((np.roll(clip.waveform, shift) - expected)[inner] ** 2))
            for shift in range(-3, 4)}
  assert min(errors, key=errors.get) == 0, errors
  assert errors[0] < 0.035, errors  # one sample late or early gives about 0.06


def peak_hz(waveform: np.ndarray) -> float:
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
  return float(np.argmax(spectrum) * RATE / len(waveform))


def assert_frames_at_times(clip, written: dict, start: float) -> None:
  """Frame i shows the latest source frame presented at or before start + timestamp i."""
  n = len(clip.timestamps)
  np.testing.assert_allclose(clip.timestamps, (np.arange(n) + 0.5) * clip.duration / n, atol=1e-5)
  times = written["frame_times"]
  expected = np.maximum(np.searchsorted(times, start + clip.timestamps, side="right") - 1, 0)
  np.testing.assert_array_equal([mf.frame_index(f) for f in clip.frames], expected)


@pytest.mark.parametrize("name", ["h264", "mpeg4"])
def test_whole_file(files, name):
  clip = media.decode_clip(path(files, name), None, None, options(mono="first"))
  assert clip.duration == pytest.approx(3.0)
  assert clip.waveform.dtype == np.float32 and clip.waveform.shape == (3 * RATE,)
  assert clip.frames.dtype == np.uint8 and clip.frames.shape == (10, 32, 32, 3)
  assert clip.timestamps.dtype == np.float32
  assert abs(peak_hz(clip.waveform) - 440.0) <= RATE / len(clip.waveform)
  assert_audio_matches(clip, 0.0, 2, "first")
  assert_frames_at_times(clip, files[name], 0.0)


@pytest.mark.parametrize("name", ["h264", "mpeg4"])
def test_segment_of_longer_file(files, name):
  # h264 has one keyframe (at 0): decoding must run from there and skip up to 1.0 s.
  clip = media.decode_clip(path(files, name), 1.0, 2.5, options(num_frames=7))
  assert clip.duration == pytest.approx(1.5)
  assert clip.waveform.shape == (24000,) and clip.frames.shape == (7, 32, 32, 3)
  assert clip.timestamps.max() < 1.5
  assert_frames_at_times(clip, files[name], 1.0)
  assert_audio_matches(clip, 1.0, 2, "mix")
  loud, quiet = (np.sqrt(np.mean(clip.waveform[a:b] ** 2)) for a, b in
                 ((1600, 14400), (17600, 22400)))  # source seconds 1.1-1.9 and 2.1-2.4
  assert loud > 2 * quiet


def test_frames_at_a_given_rate_are_centred_in_the_segment(files):
  clip = media.decode_clip(path(files, "h264"), None, None,
                           options(num_frames=4, frames_per_second=2.0))
  np.testing.assert_allclose(clip.timestamps, [0.75, 1.25, 1.75, 2.25], atol=1e-6)
  times = files["h264"]["frame_times"]
  expected = np.maximum(np.searchsorted(times, clip.timestamps, side="right") - 1, 0)
  np.testing.assert_array_equal([mf.frame_index(f) for f in clip.frames], expected)
  with pytest.raises(media.MediaError, match=r"8 frames at 2.0 per second span 3.500 s; "
                     r"segment \[0.0, 3.0\) has 3.000 s") as e:
    media.decode_clip(path(files, "h264"), None, None, options(num_frames=8,
                                                               frames_per_second=2.0))
  assert e.value.reason == "too_short"


def test_first_and_mix_differ_for_stereo(files):
  first, mix = (media.decode_clip(path(files, "h264"), 0.0, 2.0, options(mono=m))
                for m in ("first", "mix"))
  spectrum = lambda w: np.abs(np.fft.rfft(w))
  bin_660 = int(660.0 * len(mix.waveform) / RATE)
  assert spectrum(mix.waveform)[bin_660] > 0.5 * spectrum(mix.waveform).max()  # both tones
  assert spectrum(first.waveform)[bin_660] < 0.01 * spectrum(first.waveform).max()
  assert_audio_matches(first, 0.0, 2, "first")
  assert_audio_matches(mix, 0.0, 2, "mix")


@pytest.mark.parametrize("name,channels", [("wav8k", 1), ("m4a", 2)])
def test_audio_only_file(files, name, channels):
  with pytest.raises(media.MediaError) as e:
    media.decode_clip(path(files, name), None, None, options())
  assert e.value.reason == "no_video" and path(files, name) in str(e.value)
  clip = media.decode_clip(path(files, name), 0.25, 1.75,
                           options(require_video=False, mono="first"))
  assert clip.waveform.shape == (24000,) and clip.duration == pytest.approx(1.5)
  assert clip.frames.shape == (0, 32, 32, 3) and clip.timestamps.shape == (0,)
  assert abs(peak_hz(clip.waveform) - 440.0) <= RATE / len(clip.waveform)
  assert_audio_matches(clip, 0.25, channels, "first")


@pytest.mark.parametrize("name", ["vfr_h264", "vfr_mpeg4"])
def test_variable_frame_rate(files, name):
  gaps = np.diff(files[name]["frame_times"])
  assert gaps.max() > 5 * gaps.min()  # the file really is irregular
  for start, end, n in ((None, None, 16), (0.71, 2.2, 9)):  # no target on a frame time
    clip = media.decode_clip(path(files, name), start, end,
                             options(num_frames=n, require_audio=False))
    assert_frames_at_times(clip, files[name], start or 0.0)


def test_resize_and_crop():
  image = np.zeros((48, 64, 3), np.uint8)
  image[:, :8, 0] = image[:, 56:, 0] = 255  # the side strips the centre crop removes
  image[:, 8:56, 1] = 200
  out = media.resize_and_crop(image, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert (out[:, 1:-1, 1] == 200).all() and out[:, 1:-1, 0].max() == 0
  assert out[..., 0].max() < 64  # the bilinear kernel only grazes the strips at the edges
  assert media.resize_and_crop(image.transpose(1, 0, 2), 224).shape == (224, 224, 3)


def test_video_without_audio(files):
  with pytest.raises(media.MediaError) as e:
    media.decode_clip(path(files, "silent"), None, None, options())
  assert e.value.reason == "no_audio" and path(files, "silent") in str(e.value)
  clip = media.decode_clip(path(files, "silent"), 0.5, None, options(require_audio=False))
  assert clip.waveform.shape == (24000,) and not clip.waveform.any()
  assert_frames_at_times(clip, files["silent"], 0.5)


def test_seek_in_container_without_index(files):
  """MPEG-TS has no index and a non-zero start time: seeking is approximate, so decoding
  must fall back to reading from the start, and times count from the first packet."""
  p = path(files, "mpegts")
  with av.open(p) as container:
    origin = container.start_time / av.time_base
    times = np.array([f.time - origin for f in container.decode(video=0)])
  assert origin > 0 and times[0] > 0
  whole = media.decode_clip(p, None, None, options())
  clip = media.decode_clip(p, 2.3, 4.1, options())
  expected = np.maximum(np.searchsorted(times, 2.3 + clip.timestamps, side="right") - 1, 0)
  np.testing.assert_array_equal([mf.frame_index(f) for f in clip.frames], expected)
  part = whole.waveform[round(2.3 * RATE):round(4.1 * RATE)]
  assert np.sqrt(np.mean((clip.waveform - part) ** 2)) < 0.01


def test_cover_art_is_not_video(files):
  p = path(files, "cover")
  info = media.probe(p)
  assert (info["has_audio"], info["has_video"]) == (True, False)
  with pytest.raises(media.MediaError, match="no_video"):
    media.decode_clip(p)
  clip = media.decode_clip(p, None, None, options(require_video=False, mono="first"))
  assert_audio_matches(clip, 0.0, 2, "first")


def test_undecodable(files, tmp_path):
  bad = mf.damage_payload(path(files, "faststart"), str(tmp_path / "zeroed.mp4"))
  with pytest.raises(media.MediaError) as e:
    media.decode_clip(bad)
  assert e.value.reason == "undecodable" and bad in str(e.value)


def test_missing_and_empty(tmp_path):
  cases = {"missing": str(tmp_path / "nope.mp4"), "empty": mf.zero_byte(str(tmp_path / "e.mp4"))}
  for reason, p in cases.items():
    for call in (lambda: media.decode_clip(p), lambda: media.probe(p)):
      with pytest.raises(media.MediaError) as e:
        call()
      assert e.value.reason == reason and p in str(e.value)


def test_truncated(files, tmp_path):
  src = path(files, "faststart")
  # Index first: the rest of the file is missing but it opens and decodes partially.
  cut = mf.truncate(src, str(tmp_path / "cut.mp4"), 0.5)
  with pytest.raises(media.MediaError) as e:
    media.decode_clip(cut)
  assert e.value.reason in ("truncated", "corrupt") and cut in str(e.value)
  assert e.value.reason == "truncated"  # what PyAV 18 gives: data ends, duration does not
  assert media.decode_clip(cut, 0.0, 1.2, options()).duration == pytest.approx(1.2)
  # Index last (FFmpeg's default mp4): cut before the index, the file does not open.
  cut = mf.truncate(path(files, "h264"), str(tmp_path / "cut2.mp4"), 0.7)
  with pytest.raises(media.MediaError) as e:
    media.decode_clip(cut)
  assert e.value.reason == "corrupt" and cut in str(e.value)
  with open(tmp_path / "junk.mp4", "wb") as f:
    # Fixed bytes: random ones are now and then sniffed as some raw stream (MP3 frames) and open.
    f.write(b"this is not a media file\n" * 200)
  with pytest.raises(media.MediaError) as e:
    media.probe(str(tmp_path / "junk.mp4"))
  assert e.value.reason == "corrupt"


def test_too_short(files):
  p = path(files, "h264")  # 3 s
  for start, end in ((2.5, None), (2.2, 10.0), (1.0, 1.5)):
    with pytest.raises(media.MediaError) as e:
      media.decode_clip(p, start, end, options(min_seconds=1.0))
    assert e.value.reason == "too_short" and p in str(e.value)
  with pytest.raises(media.MediaError, match="too_short"):
    media.decode_clip(p, 0.0, None, options(min_seconds=5.0))
  clip = media.decode_clip(p, 1.5, 10.0, options(min_seconds=1.0))  # end clipped to the file
  assert clip.duration == pytest.approx(1.5) and clip.waveform.shape == (24000,)


def plain_decode(p: str, start: float, end: float | None, o: media.DecodeOptions) -> tuple:
  """decode_clip as it was before issue 15, written plainly for files whose seek lands
  (mp4): every video frame decoded, audio mixed to mono frame by frame, placed by pts.
  Audio stops at the first frame reaching `end`, as decode_clip (the resampler's tail
  depends on where its input ends). Returns (waveform, frames, timestamps)."""
  with av.open(p) as c:
    end = min(end or np.inf, c.duration / av.time_base)
    if start:
      c.seek(int(start * av.time_base), backward=True, any_frame=False)
    resampler = av.AudioResampler(format="fltp", rate=o.sample_rate)
    wave = np.zeros(round((end - start) * o.sample_rate), np.float32)
    video, resampled, audio_done = [], [], False
    for packet in c.demux(c.streams.audio[0], c.streams.video[0]):
      for f in packet.decode():
        if packet.stream.type == "video":
          video.append(f)
        elif not audio_done:
          resampled += resampler.resample(f)
          audio_done = f.time + f.samples / f.sample_rate >= end
    for f in resampled + resampler.resample(None):
      pos = round(f.pts * f.time_base * o.sample_rate) - round(start * o.sample_rate)
      data = media._MONO[o.mono](f.to_ndarray())
      lo, hi = max(pos, 0), min(pos + len(data), len(wave))
      if hi > lo:
        wave[lo:hi] = data[lo - pos:hi - pos]
  n = o.num_frames
  targets = start + (np.arange(n) + 0.5) * (end - start) / n
  times = np.array([f.time for f in video])
  chosen = np.maximum(np.searchsorted(times, targets, side="right") - 1, 0)
  frames = np.stack([media.resize_and_crop(video[i].to_ndarray(format="rgb24"), o.frame_size,
                                           o.frame_resize) for i in chosen])
  return wave, frames, (targets - start).astype(np.float32)


@pytest.mark.parametrize("name,start,end,mono", [
    ("h264", 0.0, None, "mix"), ("h264", 0.7, 2.3, "mix"), ("h264", 1.3, None, "first"),
    ("mpeg4", 0.0, None, "first"), ("mpeg4", 0.6, 2.9, "mix"), ("faststart", 1.1, 3.3, "mix")])
def test_same_bits_as_decoding_everything(files, name, start, end, mono):
  """Decoding stops after the last frame needed and mixes the audio once: the waveform,
  frames, timestamps and log-mel are bit for bit those of decoding every frame."""
  o = options(mono=mono, num_frames=7)
  clip = media.decode_clip(path(files, name), start, end, o)
  wave, frames, timestamps = plain_decode(path(files, name), start, end, o)
  for got, want in ((clip.waveform, wave), (clip.frames, frames), (clip.timestamps, timestamps),
                    (features.log_mel(clip.waveform, RATE, 128), features.log_mel(wave, RATE, 128))):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def test_probe(files):
  assert media.probe(path(files, "h264")) == dict(
      duration=3.0, start_time=0.0, has_audio=True, has_video=True, audio_sample_rate=44100,
      audio_channels=2, audio_codec="aac", video_width=64, video_height=48, video_fps=25.0,
      video_codec=files["h264"]["video_codec"])
  info = media.probe(path(files, "wav8k"))
  assert (info["has_video"], info["audio_sample_rate"], info["audio_channels"]) == (False, 8000, 1)


def test_bad_arguments():
  with pytest.raises(ValueError):
    media.DecodeOptions(mono="left")
  with pytest.raises(ValueError):
    media.MediaError("x.mp4", "weird", "no such reason")
  with pytest.raises(ValueError):
    media.decode_clip("x.mp4", 2.0, 1.0)
