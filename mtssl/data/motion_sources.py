"""Sources of (frame, motion label) pairs for the motion-segmentation task.

`synthetic` (mtssl.data.synthetic_video with exact masks) or
`tfrecord:/dir/or/glob` (shards of tools/extract_motion_labels.py); both
position-addressed like the image sources. Bad records are skipped and
counted; no shards is a DataSourceError.

Typical use:

    source = make_motion_source('tfrecord:/data/ms_labels')
"""

import abc
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from mtssl.data import problems
from mtssl.data import sources
from mtssl.data import synthetic_video
from mtssl.motion import labels as labels_lib
from mtssl.data import motion_records as records

TRUNCATED_SHARD = 'ms_truncated_shard'


class MotionSource(abc.ABC):
  """A deterministic, position-addressed stream of (frame, motion label)."""

  max_consecutive_skips: int = sources.MAX_CONSECUTIVE_SKIPS

  def __init__(self, name: str):
    self.name = name
    self.counter = sources.SkipCounter(name)

  def epoch_size(self) -> Optional[int]:
    """Records per epoch of a finite source, else None."""
    return None

  def _arm_counter(self):
    sources.set_skip_limit(self.counter, self.max_consecutive_skips,
                           self.epoch_size())

  @abc.abstractmethod
  def validate(self) -> None:
    """Raises DataSourceError if the source cannot supply examples."""

  @abc.abstractmethod
  def examples(self, seed: int, start: int = 0) -> tf.data.Dataset:
    """Endless (index, uint8 frame [H, W, 3], uint8 label [h, w]) from `start`."""

  def __repr__(self):
    return f'{type(self).__name__}({self.name!r})'


class SyntheticMotionSource(MotionSource):
  """Synthetic video frames with exact motion labels (no download)."""

  def __init__(self, height: int = 240, width: int = 320,
               label_stride: int = 8):
    super().__init__(f'synthetic_video({height}x{width})')
    self.height, self.width, self.label_stride = height, width, label_stride

  def validate(self):
    if min(self.height, self.width) < 16:
      raise sources.DataSourceError(
          f'synthetic video frames must be at least 16x16, got '
          f'{self.height}x{self.width}.')
    if self.height % self.label_stride or self.width % self.label_stride:
      raise sources.DataSourceError(
          f'synthetic video frames {self.height}x{self.width} are not a '
          f'multiple of the label stride {self.label_stride}.')

  def examples(self, seed, start=0):
    self.validate()
    h, w, stride = self.height, self.width, self.label_stride

    def _render(index):
      frame, mask = synthetic_video.render_frame(seed, int(index), 0, h, w)
      return frame, labels_lib.downsample_mask(mask, stride)

    def _map(index):
      frame, label = tf.numpy_function(_render, [index], [tf.uint8, tf.uint8],
                                       stateful=False)
      frame.set_shape([h, w, 3])
      label.set_shape([h // stride, w // stride])
      return index, frame, label

    return tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(
        _map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class MotionRecordSource(MotionSource):
  """Extracted motion labels in TFRecord shards, read by record index in
  graph ops (so the pipeline runs on tf.data service workers); counts travel
  with the elements (mtssl.data.problems)."""

  def __init__(self, path: str, cycle_length: int = 16):
    super().__init__(f'tfrecord:{path}')
    self.path = path
    self.cycle_length = cycle_length
    self.counter = problems.ProblemCounter(self.name)
    self._index: Optional[records.RecordIndex] = None

  @property
  def index(self) -> records.RecordIndex:
    if self._index is None:
      files = records.find_shards(self.path)
      if not files:
        raise sources.DataSourceError(
            f'No TFRecord shards at {self.path!r} (a directory of *.tfrecord '
            f'files or a glob). Make them from a folder of videos with '
            f'tools/extract_motion_labels.py.')
      index = records.index_records(files)
      for _ in index.truncated:
        self.counter.add(TRUNCATED_SHARD)
      self._index = index
    return self._index

  def validate(self):
    if not len(self.index):  # pylint: disable=g-explicit-length-test
      raise sources.DataSourceError(
          f'The shards at {self.path!r} ({len(self.index.files)} files) hold '
          f'no complete record.')

  def epoch_size(self):
    return len(self.index)

  def counted_examples(self, seed, start=0) -> tf.data.Dataset:
    """Endless (index, frame, label, int64 counts [MAX_REASONS]) from
    `start`; counts hold this record's decode status and the skips just
    before it."""
    self.validate()
    self._arm_counter()
    index = self.index
    files = tf.constant(list(index.files))
    file_ids = tf.constant(index.file_ids)
    offsets = tf.constant(index.offsets)
    counter = self.counter
    bad = (records.BAD_RECORD, records.BAD_FRAME, records.BAD_LABEL)
    codes = {reason: counter.code(reason) for reason in bad}
    return problems.counted_stream(
        self, seed, start, lambda i: records.decoded_example(
            files[file_ids[i]], offsets[i], codes), self.cycle_length,
        [codes[r] for r in bad] + list(sources.SKIPPED))

  def examples(self, seed, start=0):
    """(index, frame, label); counts go to the counter through
    numpy_function (use `counted_examples` where no Python may run)."""
    return problems.count_with(self.counter, self.counted_examples(seed, start))


def make_motion_source(spec: str, frame_size: Tuple[int, int] = (240, 320),
                       label_stride: int = 8) -> MotionSource:
  """Parses a motion source specification (see the module docstring)."""
  if not spec or spec == 'synthetic':
    return SyntheticMotionSource(frame_size[0], frame_size[1], label_stride)
  kind, _, rest = spec.partition(':')
  if kind == 'tfrecord' and rest:
    return MotionRecordSource(rest)
  raise sources.DataSourceError(
      f'Unknown motion source {spec!r}: use "synthetic" or '
      f'"tfrecord:/dir/or/glob" (shards made from a folder of videos by '
      f'tools/extract_motion_labels.py).')
