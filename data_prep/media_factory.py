"""Writes small real media files with PyAV, with content from which tests can recover time.

Video frame k is a solid colour that encodes k (`index_pattern`; read back with
`frame_index`), coarse enough to survive h264 / mpeg4 / JPEG loss and resizing. Audio
channel c is a sine at TONES[c] whose amplitude alternates every second (`tone_amplitude`:
QUIET in even seconds, LOUD in odd ones), so the time a segment came from can be checked.
"""

from __future__ import annotations

import fractions
import os
import shutil
from typing import Any, Callable

import av
import numpy as np

TONES = (440.0, 660.0)  # Hz of channel 0, 1: "first" and "mix" differ for stereo
QUIET, LOUD = 0.2, 0.5
LEVEL_STEP = 16  # colour quantum per frame-index digit: codecs err by a few levels at most
# Gaps between frames of a variable-frame-rate file, in units of 1/fps (irregular on purpose).
VFR_GAPS = (0.5, 1.5, 1.0, 2.5, 0.5, 2.0, 1.0, 0.75, 0.25, 3.0)
_VFR_TIME_BASE = fractions.Fraction(1, 1000)
_AUDIO_CHUNK = 1024  # samples per frame handed to the encoder (the AAC frame size)

Pattern = Callable[[int, float, int, int], np.ndarray]  # (index, seconds, height, width)


def index_pattern(index: int, seconds: float, height: int, width: int) -> np.ndarray:
  """Solid colour whose R, G, B are the base-16 digits of `index` (uint8 [H, W, 3])."""
  digits = [(index // 16 ** d) % 16 for d in range(3)]
  colour = np.array([LEVEL_STEP * d + LEVEL_STEP // 2 for d in digits], np.uint8)
  return np.broadcast_to(colour, (height, width, 3)).copy()


def frame_index(image: np.ndarray) -> int:
  """Inverse of `index_pattern`, from the mean colour of the image's centre."""
  h, w = image.shape[:2]
  centre = image[h // 4: h - h // 4, w // 4: w - w // 4].reshape(-1, 3).mean(axis=0)
  digits = np.clip(np.round((centre - LEVEL_STEP // 2) / LEVEL_STEP), 0, 15).astype(int)
  return int(sum(int(d) * 16 ** i for i, d in enumerate(digits)))


def tone_amplitude(seconds: np.ndarray) -> np.ndarray:
  """Amplitude of every channel at the given times: QUIET in even seconds, LOUD in odd."""
  return np.where(np.floor(seconds).astype(int) % 2 == 1, LOUD, QUIET)


def tone(seconds: float, rate: int, channels: int) -> np.ndarray:
  """The test signal, float32 [channels, samples]."""
  t = np.arange(int(round(seconds * rate))) / rate
  waves = [np.sin(2 * np.pi * TONES[c % len(TONES)] * t) for c in range(channels)]
  return (tone_amplitude(t) * np.stack(waves)).astype(np.float32)


def frame_times(seconds: float, fps: float, variable_frame_rate: bool = False) -> np.ndarray:
  """Presentation times (s) of the frames `write_video` writes."""
  if variable_frame_rate:
    gaps = np.resize(np.array(VFR_GAPS) / fps, int(2 * seconds * fps) + 2)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
  else:
    times = np.arange(int(round(seconds * fps))) / fps
  times = np.round(times / float(_VFR_TIME_BASE)) * float(_VFR_TIME_BASE)  # what pts can hold
  return times[times < seconds]


def video_encoder(codec: str) -> str:
  """`codec` if this PyAV build can encode it, else "mpeg4" (which FFmpeg always has)."""
  try:
    av.codec.Codec(codec, "w")
    return codec
  except av.codec.codec.UnknownCodecError:
    return "mpeg4"


def write_video(path: str, seconds: float = 2.0, fps: float = 25,
                size: tuple[int, int] = (64, 48), codec: str = "h264",
                audio: dict[str, Any] | None = None,
                variable_frame_rate: bool = False, pattern: Pattern = index_pattern,
                faststart: bool = False) -> dict[str, Any]:
  """Writes a video (container from the extension, e.g. .mp4) and returns what was written.

  size is (width, height). audio: None for a silent video, else dict(rate=44100,
  channels=2, codec="aac"). faststart puts the mp4 index first, so that a truncated
  copy still opens. Returns dict(path, video_codec (the encoder used; see
  video_encoder), frame_times, audio).
  """
  encoder = video_encoder(codec)
  times = frame_times(seconds, fps, variable_frame_rate)
  width, height = size
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(path, "w", options=options) as container:
    stream = container.add_stream(encoder, rate=fractions.Fraction(fps).limit_denominator(1001))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.bit_rate = 2_000_000  # near-lossless at these sizes: mpeg4's default blurs colours
    # Timestamps in ms hold any irregular gaps; mpeg4 needs a time base < 2^16.
    stream.time_base = stream.codec_context.time_base = _VFR_TIME_BASE
    audio_stream = _add_audio_stream(container, audio) if audio else None
    for k, t in enumerate(times):
      frame = av.VideoFrame.from_ndarray(pattern(k, float(t), height, width), format="rgb24")
      frame.pts, frame.time_base = int(round(t / _VFR_TIME_BASE)), _VFR_TIME_BASE
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    if audio_stream is not None:
      _encode_tone(container, audio_stream, seconds)
  return dict(path=path, video_codec=encoder, frame_times=times, audio=audio)


def write_audio(path: str, seconds: float = 2.0, rate: int = 8000, channels: int = 1,
                codec: str = "pcm_s16le", cover_art: bool = False) -> dict[str, Any]:
  """Writes an audio-only file (.wav with pcm_s16le, .m4a with aac, ...) of `tone`.

  cover_art adds an attached picture, which FFmpeg lists as a one-frame video stream
  (needs a container that takes mjpeg, e.g. .mp4 but not .m4a).
  """
  spec = dict(rate=rate, channels=channels, codec=codec)
  with av.open(path, "w") as container:
    stream = _add_audio_stream(container, spec)
    if cover_art:
      _add_cover_art(container)
    _encode_tone(container, stream, seconds)
  return dict(path=path, audio=spec)


def zero_byte(path: str) -> str:
  """Creates an empty file."""
  open(path, "wb").close()
  return path


def truncate(src: str, dst: str, fraction: float) -> str:
  """Copies the first `fraction` of the bytes of src to dst (a download cut short)."""
  size = int(os.path.getsize(src) * fraction)
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout)
    fout.truncate(size)
  return dst


def damage_payload(src: str, dst: str) -> str:
  """Copies an mp4 with the payload of its mdat box (the coded frames) zeroed, so that it
  opens but nothing decodes."""
  data = bytearray(open(src, "rb").read())
  at = data.index(b"mdat") - 4  # box: 4-byte big-endian size, then the type
  size = int.from_bytes(data[at:at + 4], "big")
  data[at + 8:at + size] = bytes(size - 8)
  with open(dst, "wb") as f:
    f.write(data)
  return dst


def _add_cover_art(container: av.container.OutputContainer) -> None:
  stream = container.add_stream("mjpeg", rate=1)
  stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
  stream.disposition = av.stream.Disposition.attached_pic
  image = av.VideoFrame.from_ndarray(index_pattern(7, 0.0, 32, 32), format="rgb24")
  frame = image.reformat(format="yuvj420p")
  frame.pts = 0
  container.mux(stream.encode(frame))
  container.mux(stream.encode(None))


def _add_audio_stream(container: av.container.OutputContainer, spec: dict[str, Any]):
  layout = {1: "mono", 2: "stereo"}[spec.get("channels", 2)]
  return container.add_stream(spec.get("codec", "aac"), rate=spec.get("rate", 44100),
                              layout=layout)


def _encode_tone(container: av.container.OutputContainer, stream, seconds: float) -> None:
  rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
  signal = tone(seconds, rate, channels)
  layout = stream.codec_context.layout.name
  for begin in range(0, signal.shape[1], _AUDIO_CHUNK):
    # PyAV converts float planar frames to the encoder's sample format itself.
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, begin:begin + _AUDIO_CHUNK]),
                                       format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, begin
    frame.time_base = fractions.Fraction(1, rate)
    container.mux(stream.encode(frame))
  container.mux(stream.encode(None))
