"""Reading videos and turning one video into motion-labelled examples.

The worker side of tools/extract_motion_labels.py, numpy and OpenCV only.
`process_video` never raises: an unusable video is skipped with a reason
(`empty_file`, `still_image`, `unreadable`, `no_frames`, `too_short`,
`failed`).
"""

import dataclasses
import os
import time
import traceback
from typing import Dict, Iterator, List, Optional

import cv2
import numpy as np

from mtssl.motion import labels as labels_lib

VIDEO_EXTENSIONS = ('.mp4', '.m4v', '.mov', '.avi', '.webm', '.mkv', '.mpg',
                    '.mpeg', '.flv', '.wmv', '.3gp', '.ogv', '.ts')
EMPTY_FILE = 'empty_file'
STILL_IMAGE = 'still_image'
UNREADABLE = 'unreadable'
NO_FRAMES = 'no_frames'
TOO_SHORT = 'too_short'
FAILED = 'failed'
SKIP_REASONS = (EMPTY_FILE, STILL_IMAGE, UNREADABLE, NO_FRAMES, TOO_SHORT,
                FAILED)

_IMAGE_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a', b'GIF89a',
                b'BM', b'II*\x00', b'MM\x00*')


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
  """What to extract from each video."""
  label: labels_lib.LabelConfig = labels_lib.LabelConfig()
  frame_step: int = 10          # label frames 0, step, 2 * step, ...
  max_examples_per_video: int = 0  # 0: no limit
  image_format: str = 'jpeg'    # how frames are stored: 'jpeg' or 'png'
  jpeg_quality: int = 95

  def validate(self):
    self.label.validate()
    if self.frame_step < 1:
      raise ValueError(f'frame_step must be positive, got {self.frame_step}.')
    if self.max_examples_per_video < 0:
      raise ValueError('max_examples_per_video must be >= 0, got '
                       f'{self.max_examples_per_video}.')
    if self.image_format not in ('jpeg', 'png'):
      raise ValueError(f"image_format must be 'jpeg' or 'png', got "
                       f'{self.image_format!r}.')
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f'jpeg_quality must be in [1, 100], got '
                       f'{self.jpeg_quality}.')

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Example:
  frame_index: int
  frame: bytes            # encoded image (image_format), RGB content
  label: bytes            # uint8 [label_height, label_width], row-major
  foreground: float


@dataclasses.dataclass
class VideoResult:
  key: str                        # the video's path relative to the input root
  reason: Optional[str] = None    # a SKIP_REASONS entry; None: processed
  message: str = ''
  frames_decoded: int = 0
  rejected: Dict[str, int] = dataclasses.field(default_factory=dict)
  examples: List[Example] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  def record(self) -> dict:
    """JSON-able completion record (without the examples)."""
    return {'reason': self.reason, 'message': self.message,
            'frames_decoded': self.frames_decoded, 'rejected': self.rejected,
            'examples': len(self.examples), 'seconds': round(self.seconds, 3)}


def list_videos(root: str) -> List[str]:
  """Paths (relative to root, sorted) of every video file below root."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for name in sorted(filenames):
      if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith('.'):
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  return found


def _looks_like_still_image(head: bytes) -> bool:
  if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
    return True
  return any(head.startswith(m) for m in _IMAGE_MAGIC)


class VideoSkipped(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def iter_frames(path: str) -> Iterator[np.ndarray]:
  """Decoded frames of a video file, uint8 RGB; raises VideoSkipped."""
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(16)
  except OSError as e:
    raise VideoSkipped(UNREADABLE, f'cannot read the file: {e}') from None
  if size == 0:
    raise VideoSkipped(EMPTY_FILE, 'the file is empty')
  if _looks_like_still_image(head):
    raise VideoSkipped(STILL_IMAGE, 'the file is a still image')
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      raise VideoSkipped(UNREADABLE, 'OpenCV cannot open it as a video')
    while True:
      ok, frame = capture.read()
      if not ok or frame is None:
        return
      if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
      else:
        frame = cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2RGB)
      yield frame
  finally:
    capture.release()


def encode_frame(frame_rgb: np.ndarray, options: ExtractOptions) -> bytes:
  bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
  if options.image_format == 'png':
    ok, data = cv2.imencode('.png', bgr)
  else:
    ok, data = cv2.imencode('.jpg', bgr,
                            [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
  if not ok:
    raise RuntimeError('OpenCV could not encode a frame')
  return data.tobytes()


def process_video(path: str, key: str, options: ExtractOptions,
                  labeler: Optional[labels_lib.MotionLabeler] = None
                  ) -> VideoResult:
  """Labels one video: accepted frames become examples.

  Bad input never raises: the result names the reason it was skipped.
  """
  start = time.monotonic()
  result = VideoResult(key)
  labeler = labeler or labels_lib.MotionLabeler(options.label)
  if labeler.config != options.label:
    raise ValueError('process_video: the labeler was made with other label '
                     'settings than the options.')
  decoded = [0]

  def counted(frames):
    for frame in frames:
      decoded[0] += 1
      yield frame

  try:
    stream = labeler.label_stream(counted(iter_frames(path)),
                                  options.frame_step)
    for index, frame, label in stream:
      if label.reason is not None:
        result.rejected[label.reason] = result.rejected.get(label.reason, 0) + 1
        continue
      result.examples.append(Example(
          index, encode_frame(frame, options), label.label.tobytes(),
          label.foreground))
      if (options.max_examples_per_video and
          len(result.examples) >= options.max_examples_per_video):
        break
    result.frames_decoded = decoded[0]
    if decoded[0] == 0:
      result.reason, result.message = NO_FRAMES, 'no frame could be decoded'
    elif decoded[0] < options.label.track_length:
      result.reason = TOO_SHORT
      result.message = (f'{decoded[0]} frames, fewer than the '
                        f'{options.label.track_length}-frame tracking window')
  except VideoSkipped as e:
    result.reason, result.message = e.reason, str(e)
  except Exception as e:  # pylint: disable=broad-except
    result.reason = FAILED
    result.message = f'{type(e).__name__}: {e}'
    result.message += ' | ' + traceback.format_exc(limit=3).replace('\n', ' ')
  if result.reason is not None:
    result.examples = []
  result.frames_decoded = decoded[0]
  result.seconds = time.monotonic() - start
  return result


# Extraction worker processes (mtssl.data.motion_extraction) ----------------------

_WORKER = {}


def init_worker(options: ExtractOptions):
  """Sets up a worker process: one OpenCV thread, a labeler for `options`."""
  cv2.setNumThreads(1)  # one process per core already
  _WORKER['options'] = options
  _WORKER['labeler'] = labels_lib.MotionLabeler(options.label)


def work(task) -> VideoResult:
  """The VideoResult of task (path, key), in a process set up by init_worker."""
  path, key = task
  return process_video(path, key, _WORKER['options'], _WORKER['labeler'])
