"""Decodes a segment of a media file into a mono waveform and N RGB frames, with PyAV.

PyAV ships its own FFmpeg; no system ffmpeg is used. Times are seconds from the file's
first presentation time (container start_time), as in datasets' segment lists (AudioSet's
start_seconds). A file's first audio and first video stream are used; cover art (an
attached picture) is not video.

Failures that are the file's fault raise MediaError with a `reason` from REASONS, so that
data_prep can count bad inputs; other OS errors (permissions, I/O) propagate unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import av
import numpy as np
from PIL import Image

REASONS: dict[str, str] = {
    "missing": "the path does not exist",
    "empty": "the file has zero bytes",
    "corrupt": "FFmpeg cannot open the file as media: not media, or its header or index is "
               "damaged or cut away (an mp4 cut before its moov atom, FFmpeg's default layout)",
    "truncated": "the file opens, but a stream's data ends clearly (TRUNCATION_TOLERANCE_S) "
                 "before the duration the container declares: a download or copy cut short",
    "no_audio": "audio is required and the file has no audio stream",
    "no_video": "video is required and the file has no video stream",
    "too_short": "the part of the segment inside the file is shorter than min_seconds",
    "undecodable": "the file opens, but a stream yields no frames (no decoder for its codec, "
                   "or decoding fails before the first frame)",
}
# A stream's data may end this much before its declared end without counting as truncated:
# encoders pad or trim the last frame and muxers round durations.
TRUNCATION_TOLERANCE_S = 0.25
_MONO = {"first": lambda planes: planes[0], "mix": lambda planes: planes.mean(axis=0)}
# Frame resize filters (PIL's, antialiased): bilinear is torchvision's default, which the
# official CAV-MAE frame extraction uses; bicubic is its dataloader's.
RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class MediaError(Exception):
  """A media file cannot give the requested clip; `reason` is a key of REASONS."""

  def __init__(self, path: str, reason: str, detail: str):
    if reason not in REASONS:
      raise ValueError(f"unknown MediaError reason {reason!r}; valid: {sorted(REASONS)}")
    self.path, self.reason, self.detail = path, reason, detail
    super().__init__(f"{path}: {detail} [{reason}]")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How a clip is decoded.

  mono: "first" keeps channel 0; "mix" averages the channels, which for stereo equals
    `ffmpeg -ac 1` to a 16-bit wav (the CAV-MAE / AST preprocessing).
  frame_size: frames are resized so the short side is frame_size, then centre-cropped.
  frame_resize: the resize filter, a key of RESIZE_FILTERS.
  min_seconds: shortest acceptable segment, after clipping its end to the file's end.
  require_audio=False: a file without audio gives a zero waveform of the segment's length.
  require_video=False: a file without video gives frames [0, S, S, 3], timestamps [0].
  frames_per_second: 0 spreads num_frames evenly over the segment; a rate takes num_frames
    at that rate, centred in the segment (a segment too short for them fails "too_short").
  """
  sample_rate: int = 16000
  mono: str = "mix"
  num_frames: int = 10
  frame_size: int = 224
  frame_resize: str = "bilinear"
  frames_per_second: float = 0.0
  min_seconds: float = 1.0
  require_video: bool = True
  require_audio: bool = True

  def __post_init__(self):
    if self.mono not in _MONO:
      raise ValueError(f"mono must be one of {sorted(_MONO)}, got {self.mono!r}")
    if self.frame_resize not in RESIZE_FILTERS:
      raise ValueError(f"frame_resize must be one of {sorted(RESIZE_FILTERS)}, got "
                       f"{self.frame_resize!r}")
    if min(self.sample_rate, self.num_frames, self.frame_size) <= 0:
      raise ValueError(f"sample_rate, num_frames and frame_size must be positive: {self}")
    if self.frames_per_second < 0:
      raise ValueError(f"frames_per_second must be 0 (evenly spaced) or a rate: {self}")


@dataclasses.dataclass
class Clip:
  """A decoded segment; timestamps are seconds from the segment's start."""
  waveform: np.ndarray  # float32 [round(duration * sample_rate)], mono
  frames: np.ndarray  # uint8 [N, S, S, 3]; N = 0 without video
  timestamps: np.ndarray  # float32 [N]
  duration: float  # seconds


def decode_clip(path: str, start: float | None = None, end: float | None = None,
                options: DecodeOptions = DecodeOptions()) -> Clip:
  """Decodes [start, end) of `path` (None: the file's start / end; end is clipped to it).

  Frame i is the one on screen at (i + 0.5) * duration / N (with options.frames_per_second
  R: at the centre + (i - (N - 1) / 2) / R): the latest presented at or before that time (the
  first frame if none is), so variable frame rates work. Audio is
  resampled by FFmpeg (av.AudioResampler) and placed by its timestamps: where the audio
  stream does not cover the segment (it ends before the video) the waveform is zero.
  """
  if start is not None and (not start >= 0 or (end is not None and end < start)):
    raise ValueError(f"{path}: bad segment [{start}, {end})")
  with _open(path) as container:
    plan = _plan(path, container, start or 0.0, end)
    for kind, required in (("audio", options.require_audio), ("video", options.require_video)):
      if required and kind not in plan.spans:
        raise MediaError(path, f"no_{kind}", f"the file has no {kind} stream")
    if plan.end - plan.start < options.min_seconds:
      raise MediaError(path, "too_short", f"the file lasts {plan.file_duration:.3f} s, so segment "
                       f"[{plan.start}, {end}) has {max(plan.end - plan.start, 0):.3f} s; at "
                       f"least {options.min_seconds} s are required")
    span = (options.num_frames - 1) / options.frames_per_second if options.frames_per_second else 0
    if "video" in plan.spans and span >= plan.end - plan.start:
      raise MediaError(path, "too_short", f"{options.num_frames} frames at "
                       f"{options.frames_per_second} per second span {span:.3f} s; segment "
                       f"[{plan.start}, {plan.end}) has {plan.end - plan.start:.3f} s")
    sinks, error = _run(container, plan, options, seek=plan.start > 0)
  if _overshot(sinks, plan):  # the seek skipped data the segment needs: read from the start
    with _open(path) as container:
      sinks, error = _run(container, plan, options, seek=False)
  for sink in sinks.values():
    _check_coverage(path, sink, plan, error)
  duration, size = plan.end - plan.start, options.frame_size
  audio, video = sinks.get("audio"), sinks.get("video")
  return Clip(
      waveform=audio.out if audio else np.zeros(round(duration * options.sample_rate), np.float32),
      frames=(video.images(size, options.frame_resize) if video
              else np.zeros((0, size, size, 3), np.uint8)),
      timestamps=(video.targets - video.start if video else np.zeros(0)).astype(np.float32),
      duration=duration)


def probe(path: str) -> dict[str, Any]:
  """duration (s), start_time (s), has_audio, has_video, audio_sample_rate, audio_channels,
  audio_codec, video_width, video_height, video_fps, video_codec (None when absent)."""
  with _open(path) as container:
    audio, video = _stream(container, "audio"), _stream(container, "video")
    rate = (video.average_rate or video.guessed_rate) if video else None
    return dict(
        duration=_container_duration(path, container),
        start_time=(container.start_time or 0) / av.time_base,
        has_audio=audio is not None, has_video=video is not None,
        audio_sample_rate=audio.sample_rate if audio else None,
        audio_channels=audio.channels if audio else None,
        audio_codec=audio.codec_context.name if audio else None,
        video_width=video.width if video else None,
        video_height=video.height if video else None,
        video_fps=float(rate) if rate else None,
        video_codec=video.codec_context.name if video else None)


def resize_and_crop(image: np.ndarray, size: int, resize: str = "bilinear") -> np.ndarray:
  """Resizes (antialiased, with the `resize` filter of RESIZE_FILTERS) so the short side is
  `size`, then centre-crops to size x size; in one step, by resizing just the crop's source
  box (the filter still reads the pixels around it, as a resize of the whole frame)."""
  h, w = image.shape[:2]
  side = min(h, w)
  left, top = (w - side) / 2, (h - side) / 2
  resized = Image.fromarray(image).resize((size, size), RESIZE_FILTERS[resize],
                                          box=(left, top, left + side, top + side))
  return np.asarray(resized, dtype=np.uint8)


def _open(path: str) -> av.container.InputContainer:
  if not os.path.exists(path):
    raise MediaError(path, "missing", "no such file")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise MediaError(path, "empty", "the file has zero bytes")
  try:
    return av.open(path, "r")
  except FileNotFoundError as e:  # deleted meanwhile (PyAV's error subclasses this one)
    raise MediaError(path, "missing", str(e)) from e
  except av.error.FFmpegError as e:
    raise MediaError(path, "corrupt", f"cannot be opened as media ({e})") from e


def _stream(container: av.container.InputContainer, kind: str) -> av.stream.Stream | None:
  """The first stream of a kind; cover art (mp3, m4a) is a one-picture "video" stream."""
  return next((s for s in getattr(container.streams, kind)
               if not s.disposition & av.stream.Disposition.attached_pic), None)


def _container_duration(path: str, container: av.container.InputContainer) -> float:
  if container.duration is not None:
    return container.duration / av.time_base
  with _open(path) as scan:  # raw elementary streams declare none: measure the packets
    ends = [float((p.pts + (p.duration or 0)) * p.time_base) for p in scan.demux()
            if p.pts is not None]
  return max(ends, default=0.0) - (container.start_time or 0) / av.time_base


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The segment [start, end) in seconds from the file's start `origin` (in stream time);
  spans[kind] = (stream index, stream start, stream end), in stream time."""
  origin: float
  start: float
  end: float
  file_duration: float
  spans: dict[str, tuple[int, float, float]]


def _plan(path: str, container: av.container.InputContainer, start: float,
          end: float | None) -> _Plan:
  origin = (container.start_time or 0) / av.time_base
  duration = _container_duration(path, container)
  spans = {}
  for kind in ("audio", "video"):
    if s := _stream(container, kind):
      first = float(s.start_time * s.time_base) if s.start_time is not None else origin
      last = first + float(s.duration * s.time_base) if s.duration else origin + duration
      spans[kind] = (s.index, first, last)
  return _Plan(origin, start, duration if end is None else min(end, duration), duration, spans)


class _Sink:
  """Takes one stream's decoded frames in presentation order, from the seek point on.
  `covered`: the stream time its data reaches; `done`: it has passed the segment's end."""

  def __init__(self, kind: str, plan: _Plan):
    self.kind, (_, self.stream_start, self.stream_end) = kind, plan.spans[kind]
    self.start, self.end = plan.origin + plan.start, plan.origin + plan.end
    self.first = self.covered = None
    self.done = False

  def take(self, packet: av.Packet) -> None:
    for frame in (() if self.done else packet.decode()):
      self.add(frame)

  def _time(self, frame: av.frame.Frame, length: float) -> float:
    t = frame.time if frame.time is not None else (self.covered or self.start)
    self.first = t if self.first is None else self.first
    self.covered = t + length
    return t


class _AudioSink(_Sink):
  """Resamples from the seek point on (swresample's filter needs the context) and keeps
  the segment's samples, placed by timestamp, so gaps in the stream stay zero."""

  def __init__(self, stream: av.audio.stream.AudioStream, plan: _Plan, options: DecodeOptions):
    super().__init__("audio", plan)
    self.rate, self.pick = options.sample_rate, _MONO[options.mono]
    # Float planes in the input's layout: `pick` makes mono ("first" / "mix").
    self.resampler = av.AudioResampler(format="fltp", rate=self.rate)
    self.offset = self.next = round(self.start * self.rate)
    self.length = round((plan.end - plan.start) * self.rate)
    # The segment's planes [channels, length], mixed to mono once in finish(): per-frame
    # to_ndarray and mean cost 4x the AAC decoding. Column by column the same arithmetic.
    self.planes: np.ndarray | None = None
    self.unit_pts = None  # whether resampled pts count samples (time base 1 / rate)

  def add(self, frame: av.AudioFrame) -> None:
    self._time(frame, frame.samples / frame.sample_rate)
    self.done = self.covered >= self.end
    self._place(self.resampler.resample(frame))

  def finish(self) -> None:
    self._place(self.resampler.resample(None))  # the resampler's buffered tail
    self.out = (np.zeros(self.length, np.float32) if self.planes is None
                else self.pick(self.planes))

  def _place(self, frames: list[av.AudioFrame]) -> None:
    for f in frames:
      if f.pts is None:
        pos = self.next
      else:
        if self.unit_pts is None:  # Fraction arithmetic costs more than the rest: once
          self.unit_pts = f.time_base * self.rate == 1
        pos = f.pts if self.unit_pts else round(f.pts * f.time_base * self.rate)
      self.next = pos + f.samples
      lo, hi = max(pos, self.offset), min(self.next, self.offset + self.length)
      if hi <= lo:
        continue
      if self.planes is None:
        self.planes = np.zeros((len(f.planes), self.length), np.float32)
      for row, plane in zip(self.planes, f.planes):
        row[lo - self.offset:hi - self.offset] = np.frombuffer(
            plane, np.float32, f.samples)[lo - pos:hi - pos]


class _VideoSink(_Sink):
  """For each target time keeps the latest frame presented at or before it. Decoding stops
  once every target has its frame; later packets only show how far the data reaches."""

  def __init__(self, stream: av.video.stream.VideoStream, plan: _Plan, options: DecodeOptions):
    super().__init__("video", plan)
    n, rate = options.num_frames, options.frames_per_second
    if rate:  # at that rate, centred in the segment
      self.targets = (self.start + self.end) / 2 + (np.arange(n) - (n - 1) / 2) / rate
    else:
      self.targets = self.start + (np.arange(n) + 0.5) * (plan.end - plan.start) / n
    rate = stream.average_rate or stream.guessed_rate
    self.step = float(1 / rate) if rate else 0.0  # a frame's duration when it carries none
    self.chosen: list[av.VideoFrame] = []
    self.prev = None

  def take(self, packet: av.Packet) -> None:
    if len(self.chosen) < len(self.targets):
      super().take(packet)
    elif not self.done and packet.size:  # size 0: the demuxer's flush packet
      t = float(packet.pts * packet.time_base) if packet.pts is not None else self.covered
      length = float(packet.duration * packet.time_base) if packet.duration else self.step
      self.covered = max(self.covered, t + length)  # decode order: pts go back and forth
      self.done = t >= self.end

  def add(self, frame: av.VideoFrame) -> None:
    t = self._time(frame, float(frame.duration * frame.time_base) if frame.duration else self.step)
    while len(self.chosen) < len(self.targets) and self.targets[len(self.chosen)] < t:
      self.chosen.append(frame if self.prev is None else self.prev)
    self.prev = frame
    self.done = t >= self.end

  def finish(self) -> None:
    self.chosen += [self.prev] * (len(self.targets) - len(self.chosen))

  def images(self, size: int, resize: str) -> np.ndarray:
    converted = {}  # a frame chosen for several targets is converted once
    for f in self.chosen:
      if id(f) not in converted:
        converted[id(f)] = resize_and_crop(f.to_ndarray(format="rgb24"), size, resize)
    return np.stack([converted[id(f)] for f in self.chosen])


_SINKS = {"audio": _AudioSink, "video": _VideoSink}


def _run(container: av.container.InputContainer, plan: _Plan, options: DecodeOptions,
         seek: bool) -> tuple[dict[str, _Sink], Exception | None]:
  """Decodes all streams in one pass; returns the sinks by kind and the error, if any,
  that stopped decoding (a file cut short typically ends in InvalidDataError)."""
  sinks = {index: _SINKS[kind](container.streams[index], plan, options)
           for kind, (index, _, _) in plan.spans.items()}
  if seek:  # lands on the keyframe at or before start; the sinks pass over what precedes it
    container.seek(int((plan.origin + plan.start) * av.time_base), backward=True, any_frame=False)
  error = None
  try:
    for packet in container.demux([container.streams[i] for i in sinks]):
      sinks[packet.stream.index].take(packet)
      if all(s.done for s in sinks.values()):
        break
  except (av.error.FFmpegError, ValueError) as e:  # ValueError: format change mid-stream
    error = e
  for sink in sinks.values():
    sink.finish()
  return {sink.kind: sink for sink in sinks.values()}, error


def _overshot(sinks: dict[str, _Sink], plan: _Plan) -> bool:
  """Whether a stream's data began after the segment's start although the stream has some
  there (seeking is approximate in containers without an index, e.g. MPEG-TS)."""
  return plan.start > 0 and any(s.first is not None and s.first > max(s.start, s.stream_start)
                                + 1e-3 for s in sinks.values())


def _check_coverage(path: str, sink: _Sink, plan: _Plan, error: Exception | None) -> None:
  needed = min(sink.end, sink.stream_end)  # a stream may legitimately end before the file
  cause = f" ({type(error).__name__}: {error})" if error else ""
  wanted = needed > sink.start + TRUNCATION_TOLERANCE_S
  if sink.first is None and (error or sink.kind == "video" or wanted):
    raise MediaError(path, "truncated" if wanted and not error else "undecodable",
                     f"its {sink.kind} stream gave no frames for the segment "
                     f"[{plan.start:.2f}, {plan.end:.2f}) s{cause}")
  if sink.first is not None and sink.covered < needed - TRUNCATION_TOLERANCE_S:
    raise MediaError(path, "truncated", f"its {sink.kind} data ends at "
                     f"{sink.covered - plan.origin:.2f} s but the container declares "
                     f"{needed - plan.origin:.2f} s{cause}")
