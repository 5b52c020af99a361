"""Image sources of every task: `synthetic`, `folder:/path`, `tfds:NAME[:SPLIT]`.

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
import threading
from typing import Dict, Optional, Tuple

import cv2
import numpy as np
import tensorflow as tf

from mtssl.data import synthetic

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
# Status codes returned by decode_image_bytes.
OK, GRAYSCALE, ALPHA, SIXTEEN_BIT, EMPTY, CORRUPT, TRUNCATED = range(7)
STATUS_NAMES = {
    OK: 'ok', GRAYSCALE: 'converted_grayscale', ALPHA: 'converted_alpha',
    SIXTEEN_BIT: 'converted_16bit', EMPTY: 'skipped_empty',
    CORRUPT: 'skipped_corrupt', TRUNCATED: 'skipped_truncated',
}
SKIPPED = (EMPTY, CORRUPT, TRUNCATED)


class DataSourceError(ValueError):
  """A source that cannot supply data; raised before any training work."""


class SkipCounter:
  """Thread-safe counts of skipped / converted examples, by reason.

  Updated from inside tf.data (through numpy_function), read by the trainer.
  """

  def __init__(self, name: str = ''):
    self.name = name
    self._lock = threading.Lock()
    self._counts = collections.Counter()

  def add(self, reason: str, n: int = 1):
    with self._lock:
      self._counts[reason] += n

  def snapshot(self) -> Dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def problems(self) -> Dict[str, int]:
    """Everything but the plain 'ok' decodes."""
    return {k: v for k, v in self.snapshot().items() if k != 'ok'}

  def keep(self, keep: tf.Tensor, reason: str) -> tf.Tensor:
    """Passes a boolean through, counting `reason` when it is False.

    For use in `Dataset.filter`: `ds.filter(lambda x: counter.keep(ok, 'why'))`.
    """
    def _count(flag):
      if not flag:
        self.add(reason)
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


def decode_image_bytes(data: bytes) -> Tuple[Optional[np.ndarray], int]:
  """Decodes any image file to uint8 RGB [H, W, 3]. Returns (image, status).

  The image is None when the status is one of SKIPPED.
  """
  if not data:
    return None, EMPTY
  if _is_truncated(data):
    return None, TRUNCATED
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


def decode_in_dataset(encoded: tf.Tensor, counter: SkipCounter):
  """tf.data map fn: bytes -> (uint8 [H, W, 3] image, ok flag); counts status."""
  def _decode(data):
    image, status = decode_image_bytes(bytes(data))
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

  def __init__(self, name: str):
    self.name = name
    self.counter = SkipCounter(name)

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
    height, width = self.height, self.width

    def _render(index):
      return synthetic.synthetic_image(seed, int(index), height, width)

    def _map(index):
      image = tf.numpy_function(_render, [index], tf.uint8, stateful=False)
      image.set_shape([height, width, 3])
      return index, image

    return tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(
        _map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def list_image_files(root: str):
  files = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for name in sorted(filenames):
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'):
        files.append(os.path.join(dirpath, name))
  return files


def _epoch_permutation_index(k, n, seed):
  """Position k of an endless stream over n items, reshuffled every epoch."""
  epoch = k // n
  pos = k % n
  return tf.random.experimental.index_shuffle(
      pos, seed=tf.stack([tf.cast(seed, tf.int64), epoch]), max_index=n - 1)


class FolderImageSource(ImageSource):
  """Every image file below a folder (nested folders included), endlessly.

  Each epoch visits every file once in an order shuffled by (seed, epoch).
  """

  def __init__(self, root: str):
    super().__init__(f'folder:{root}')
    self.root = root
    self._files = None

  @property
  def files(self):
    if self._files is None:
      self._files = list_image_files(self.root)
    return self._files

  def validate(self):
    if not os.path.isdir(self.root):
      raise DataSourceError(f'Image folder {self.root!r} does not exist or is '
                            f'not a directory.')
    if not self.files:
      raise DataSourceError(
          f'Image folder {self.root!r} contains no image files '
          f'({", ".join(IMAGE_EXTENSIONS)}).')

  def images(self, seed, start=0):
    self.validate()
    files = tf.constant(self.files)
    n = len(self.files)
    counter = self.counter

    def _read(k):
      i = _epoch_permutation_index(k, n, seed)
      data = tf.io.read_file(files[i])
      image, ok = decode_in_dataset(data, counter)
      return k, image, ok

    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(
        _read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda k, image, ok: ok)
    return ds.map(lambda k, image, ok: (k, image))


class TfdsImageSource(ImageSource):
  """An image dataset that TFDS has already prepared under `data_dir`.

  Nothing is downloaded: a dataset that is not prepared is a DataSourceError
  telling how to prepare it (imagenet2012 needs its archives placed in the
  TFDS manual directory, as TFDS documents).
  """

  def __init__(self, dataset: str, split: str = 'train',
               data_dir: Optional[str] = None, image_key: str = 'image'):
    super().__init__(f'tfds:{dataset}:{split}')
    self.dataset = dataset
    self.split = split
    self.data_dir = data_dir
    self.image_key = image_key

  def _builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      return tfds.builder(self.dataset, data_dir=self.data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise DataSourceError(f'TFDS dataset {self.dataset!r}: '
                            f'{str(e).splitlines()[0]}') from None

  def validate(self):
    builder = self._builder()
    if not builder.is_prepared():
      raise DataSourceError(
          f'TFDS dataset {self.dataset!r} is not prepared in '
          f'{builder.data_dir!r}. Prepare it first (nothing is downloaded at '
          f'run time), e.g. `tfds build {self.dataset} --data_dir=...`; '
          f'imagenet2012 needs its archives in the TFDS manual_dir.')
    split_name = self.split.split('[')[0]
    if split_name not in builder.info.splits:
      raise DataSourceError(
          f'TFDS dataset {self.dataset!r} has no split {self.split!r}; it has '
          f'{sorted(builder.info.splits)}.')
    if self.image_key not in builder.info.features:
      raise DataSourceError(
          f'TFDS dataset {self.dataset!r} has no feature {self.image_key!r}; '
          f'it has {sorted(builder.info.features)}.')

  def records(self, seed, start=0, decoders=None):
    """Endless, seeded record stream (images left encoded), from `start`."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.validate()
    builder = self._builder()
    decoders = dict(decoders or {})
    decoders.setdefault(self.image_key, tfds.decode.SkipDecoding())
    read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True)
    ds = builder.as_dataset(split=self.split, shuffle_files=True,
                            decoders=decoders, read_config=read_config)
    ds = ds.repeat().enumerate().skip(start)
    return ds

  def images(self, seed, start=0):
    counter = self.counter
    key = self.image_key

    def _decode(k, record):
      image, ok = decode_in_dataset(record[key], counter)
      return k, image, ok

    ds = self.records(seed, start).map(
        _decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda k, image, ok: ok)
    return ds.map(lambda k, image, ok: (k, image))


def make_image_source(spec: str, tfds_data_dir: Optional[str] = None,
                      synthetic_size: Tuple[int, int] = (256, 256)) -> ImageSource:
  """Parses a source specification (see module docstring)."""
  if not spec or spec == 'synthetic':
    return SyntheticImageSource(*synthetic_size)
  kind, _, rest = spec.partition(':')
  if kind == 'folder' and rest:
    return FolderImageSource(os.path.expanduser(rest))
  if kind == 'tfds' and rest:
    name, _, split = rest.partition(':')
    return TfdsImageSource(name, split or 'train', data_dir=tfds_data_dir)
  if kind == 'tfrecord' and rest:
    from mtssl.data import image_records  # pylint: disable=g-import-not-at-top
    return image_records.TfrecordImageSource(rest)
  raise DataSourceError(
      f'Unknown data source {spec!r}: use "synthetic", "folder:/path", '
      f'"tfds:name[:split]" or "tfrecord:/dir/or/glob".')
