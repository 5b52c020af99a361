"""Image sources of every task: `synthetic`, `folder:/path`, `tfds:NAME[:SPLIT]`,
`tfrecord:/dir/or/glob`.

This module holds the source interface, the Python decoder and counters, and
the synthetic source; the others are in mtssl.data.folder_source,
tfds_source and image_records.

A source is a position-addressed stream of RGB uint8 images (element k
fixed by (seed, k)). Undecodable or converted images are counted by reason
in its `SkipCounter`; an empty or missing source is a `DataSourceError`
from `validate()`.

Typical use:

    source = make_image_source('folder:/data/images')   # or synthetic,
    source.validate()                                  # tfds:NAME[:SPLIT],
                                                       # tfrecord:/dir/or/glob
"""

import abc
import collections
import os
import struct
import threading
from typing import Dict, Optional, Tuple

import cv2
import numpy as np
import tensorflow as tf

from mtssl.data import synthetic

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
# Status codes returned by decode_image_bytes.
(OK, GRAYSCALE, ALPHA, SIXTEEN_BIT, EMPTY, CORRUPT, TRUNCATED, TOO_LARGE,
 UNREADABLE) = range(9)
STATUS_NAMES = {
    OK: 'ok', GRAYSCALE: 'converted_grayscale', ALPHA: 'converted_alpha',
    SIXTEEN_BIT: 'converted_16bit', EMPTY: 'skipped_empty',
    CORRUPT: 'skipped_corrupt', TRUNCATED: 'skipped_truncated',
    TOO_LARGE: 'skipped_too_large', UNREADABLE: 'skipped_unreadable',
}
SKIPPED = (EMPTY, CORRUPT, TRUNCATED, TOO_LARGE, UNREADABLE)
# Defaults of TrainConfig.max_consecutive_skips / max_image_pixels (BUILD.md).
MAX_CONSECUTIVE_SKIPS = 1000
MAX_IMAGE_PIXELS = 36_000_000


class DataSourceError(ValueError):
  """A source that cannot supply data; the message names it."""


class SourceStalled(DataSourceError):
  """Raised inside tf.data when a source has stopped yielding usable data."""


# Starts the message of a graph-only source's stop (mtssl.data.problems).
STALLED_MARKER = 'mtssl source stalled: '


def raise_if_stalled(error: Exception, *counters) -> None:
  """Re-raises tf.data's `error` as the DataSourceError a counter recorded
  (or a graph-only pipeline stated in it)."""
  for counter in counters:
    if counter.failure:
      raise DataSourceError(counter.failure) from None
  text = str(error)
  if STALLED_MARKER in text:
    message = text.split(STALLED_MARKER, 1)[1].split(']', 1)[0]
    raise DataSourceError(message.strip().strip('"\'')) from None


class SkipCounter:
  """Thread-safe counts of skipped / converted examples, by reason.

  Updated from inside tf.data (through numpy_function), read by the trainer.
  """

  def __init__(self, name: str = ''):
    self.name = name
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self._streaks = collections.Counter()
    # Consecutive skips at one stage that stop the source (None: unbounded).
    self.limit: Optional[int] = None
    self.limit_reason = ''
    self.failure: Optional[str] = None

  def add(self, reason: str, n: int = 1):
    with self._lock:
      self._counts[reason] += n

  def snapshot(self) -> Dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def problems(self) -> Dict[str, int]:
    """Everything but the plain 'ok' decodes."""
    return {k: v for k, v in self.snapshot().items() if k != 'ok'}

  def _streak(self, reason: str, kept: bool):
    with self._lock:
      self._streaks[reason] = 0 if kept else self._streaks[reason] + 1
      streak = self._streaks[reason]
    if self.limit is not None and streak >= self.limit:
      if self.failure:  # The pipeline may call once more before it stops.
        raise SourceStalled(self.failure)
      counts = ', '.join(f'{k} {v}' for k, v in sorted(self.problems().items()))
      self.failure = (
          f'{self.name}: {streak} elements in a row skipped ({reason}; '
          f'{self.limit_reason}); counts so far: {counts or "none"}. The '
          f'source yields no usable data.')
      raise SourceStalled(self.failure)

  def keep(self, keep: tf.Tensor, reason: str, count: bool = True) -> tf.Tensor:
    """Passes a boolean through, counting `reason` when it is False (unless
    `count` is False: already counted). Too many False in a row raise
    SourceStalled (see `limit`).

    For use in `Dataset.filter` (a sequential stage, so "in a row" follows the
    stream): `ds.filter(lambda x: counter.keep(ok, 'why'))`.
    """
    def _count(flag):
      if not flag and count:
        self.add(reason)
      self._streak(reason, bool(flag))
      return flag
    out = tf.numpy_function(_count, [keep], tf.bool, stateful=True)
    out.set_shape([])
    return out

  def note(self, condition: tf.Tensor, reason: str, value: tf.Tensor) -> tf.Tensor:
    """Returns `value` unchanged, counting `reason` when condition is True."""
    def _count(flag):
      if flag:
        self.add(reason)
      return np.int32(0)
    zero = tf.numpy_function(_count, [condition], tf.int32, stateful=True)
    with tf.control_dependencies([zero]):
      return tf.identity(value)


def _is_truncated(data: bytes) -> bool:
  tail = data.rstrip(b'\0 \r\n\t')
  if data[:2] == b'\xff\xd8':  # JPEG must end with the EOI marker.
    return not tail.endswith(b'\xff\xd9')
  if data[:8] == b'\x89PNG\r\n\x1a\n':  # PNG must end with an IEND chunk.
    return b'IEND' not in data[-16:]
  return False


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
  i = 2
  while i + 9 <= len(data):
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:  # Fill byte.
      i += 1
      continue
    if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
      i += 2
      continue
    length = struct.unpack('>H', data[i + 2:i + 4])[0]
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      height, width = struct.unpack('>HH', data[i + 5:i + 9])
      return width, height
    i += 2 + length
  return None


def _webp_size(data: bytes) -> Optional[Tuple[int, int]]:
  chunk = data[12:16]
  if chunk == b'VP8X' and len(data) >= 30:
    return (int.from_bytes(data[24:27], 'little') + 1,
            int.from_bytes(data[27:30], 'little') + 1)
  if chunk == b'VP8 ' and len(data) >= 30:
    width, height = struct.unpack('<HH', data[26:30])
    return width & 0x3FFF, height & 0x3FFF
  if chunk == b'VP8L' and len(data) >= 25:
    bits = int.from_bytes(data[21:25], 'little')
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
  return None


def header_pixels(data: bytes) -> Optional[int]:
  """Width x height from a PNG, JPEG, BMP or WebP header; None when unknown.

  Read without decoding, so an oversized image is refused before it takes
  memory.
  """
  size = None
  if data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) >= 24:
    size = struct.unpack('>II', data[16:24])
  elif data[:2] == b'\xff\xd8':
    size = _jpeg_size(data)
  elif data[:2] == b'BM' and len(data) >= 26:
    width, height = struct.unpack('<ii', data[18:26])
    size = abs(width), abs(height)
  elif data[:4] == b'RIFF' and data[8:12] == b'WEBP':
    size = _webp_size(data)
  return None if size is None else int(size[0]) * int(size[1])


def decode_image_bytes(data: bytes, max_pixels: Optional[int] = None
                       ) -> Tuple[Optional[np.ndarray], int]:
  """Decodes any image file to uint8 RGB [H, W, 3]. Returns (image, status).

  The image is None when the status is one of SKIPPED; images whose header
  gives more than `max_pixels` pixels are not decoded (TOO_LARGE).
  """
  if not data:
    return None, EMPTY
  if _is_truncated(data):
    return None, TRUNCATED
  if max_pixels is not None:
    pixels = header_pixels(data)
    if pixels is not None and pixels > max_pixels:
      return None, TOO_LARGE
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if image is None or image.size == 0:
    return None, CORRUPT
  status = OK
  if image.dtype == np.uint16:
    image = (image >> 8).astype(np.uint8)
    status = SIXTEEN_BIT
  elif image.dtype != np.uint8:
    return None, CORRUPT
  if image.ndim == 2 or image.shape[2] == 1:
    image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    status = status if status != OK else GRAYSCALE
  elif image.shape[2] == 4:
    # Composite over white, as viewers show transparent images.
    alpha = image[..., 3:4].astype(np.float32) / 255.0
    bgr = image[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)
    image = cv2.cvtColor(bgr.round().astype(np.uint8), cv2.COLOR_BGR2RGB)
    status = status if status != OK else ALPHA
  elif image.shape[2] == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  else:
    return None, CORRUPT
  return np.ascontiguousarray(image), status


def decode_in_dataset(encoded: tf.Tensor, counter: SkipCounter,
                      max_pixels: Optional[int] = None):
  """tf.data map fn: bytes -> (uint8 [H, W, 3] image, ok flag), through
  OpenCV; counts the status."""
  def _decode(data):
    data = bytes(data)
    image, status = decode_image_bytes(data, max_pixels)
    counter.add(STATUS_NAMES[status])
    if image is None:
      return np.zeros((1, 1, 3), np.uint8), False
    return image, True
  image, ok = tf.numpy_function(_decode, [encoded], [tf.uint8, tf.bool],
                                stateful=True)
  image.set_shape([None, None, 3])
  ok.set_shape([])
  return image, ok


class ImageSource(abc.ABC):
  """A deterministic, position-addressed, endless stream of RGB uint8 images."""

  max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS
  max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS

  def __init__(self, name: str):
    self.name = name
    self.counter = SkipCounter(name)

  def epoch_size(self) -> Optional[int]:
    """Elements per epoch of a finite source, else None."""
    return None

  def _arm_counter(self):
    """Sets the counter's stop rule before a pipeline is built."""
    set_skip_limit(self.counter, self.max_consecutive_skips, self.epoch_size())

  @abc.abstractmethod
  def validate(self) -> None:
    """Raises DataSourceError if the source cannot supply images."""

  @abc.abstractmethod
  def images(self, seed: int, start: int = 0) -> tf.data.Dataset:
    """Endless dataset of (index, uint8 [H, W, 3] image) from position `start`.

    `index` is the element's position k in the stream; tasks seed their own
    randomness with it. Skipped elements keep their index (the stream has a
    gap), so positions stay stable across restarts.
    """

  def __repr__(self):
    return f'{type(self).__name__}({self.name!r})'


class SyntheticImageSource(ImageSource):
  """Procedural scenes from mtssl.data.synthetic (never needs a download)."""

  def __init__(self, height: int = 256, width: int = 256):
    super().__init__(f'synthetic({height}x{width})')
    self.height = height
    self.width = width

  def validate(self):
    if self.height < 16 or self.width < 16:
      raise DataSourceError(f'synthetic images must be at least 16x16, got '
                            f'{self.height}x{self.width}.')

  def images(self, seed, start=0):
    self._arm_counter()
    height, width = self.height, self.width

    def _render(index):
      return synthetic.synthetic_image(seed, int(index), height, width)

    def _map(index):
      image = tf.numpy_function(_render, [index], tf.uint8, stateful=False)
      image.set_shape([height, width, 3])
      return index, image

    return tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(
        _map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def set_skip_limit(counter: SkipCounter, max_consecutive: int,
                   epoch_size: Optional[int]):
  """The counter stops after `max_consecutive` skips in a row, or after
  2n - 1 for a source of n elements (that span always holds a whole epoch)."""
  counter.limit = max_consecutive
  counter.limit_reason = f'max_consecutive_skips={max_consecutive}'
  if epoch_size and 2 * epoch_size - 1 < max_consecutive:
    counter.limit = 2 * epoch_size - 1
    counter.limit_reason = (f'a whole epoch of {epoch_size} elements gave '
                            f'nothing')


def list_image_files(root: str):
  files = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for name in sorted(filenames):
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'):
        files.append(os.path.join(dirpath, name))
  return files


def epoch_permutation_index(k, n, seed):
  """Position k of an endless stream over n items, reshuffled every epoch."""
  epoch = k // n
  pos = k % n
  return tf.random.experimental.index_shuffle(
      pos, seed=tf.stack([tf.cast(seed, tf.int64), epoch]), max_index=n - 1)


def make_image_source(spec: str, tfds_data_dir: Optional[str] = None,
                      synthetic_size: Tuple[int, int] = (256, 256)) -> ImageSource:
  """Parses a source specification (see module docstring)."""
  if not spec or spec == 'synthetic':
    return SyntheticImageSource(*synthetic_size)
  kind, _, rest = spec.partition(':')
  if kind == 'folder' and rest:
    from mtssl.data import folder_source  # pylint: disable=g-import-not-at-top
    return folder_source.FolderImageSource(os.path.expanduser(rest))
  if kind == 'tfds' and rest:
    from mtssl.data import tfds_source  # pylint: disable=g-import-not-at-top
    name, _, split = rest.partition(':')
    source = tfds_source.TfdsImageSource(name, split or 'train',
                                         data_dir=tfds_data_dir)
    return source.as_shards() or source
  if kind == 'tfrecord' and rest:
    from mtssl.data import image_records  # pylint: disable=g-import-not-at-top
    return image_records.TfrecordImageSource(rest)
  raise DataSourceError(
      f'Unknown data source {spec!r}: use "synthetic", "folder:/path", '
      f'"tfds:name[:split]" or "tfrecord:/dir/or/glob".')
