"""Image TFRecord shards (the TFDS / Model Garden ImageNet format), read by
record index with graph ops only.

A shard is a TFRecord file of `tf.train.Example`s with

  image/encoded      bytes  the encoded image (JPEG, PNG, BMP, GIF or WebP)
  image/class/label  int64  optional class label

Beside each shard `SHARD.index` lists the byte offset of every record
(int64 [size of the shard, offsets...]); `make_shards` writes it, and a shard
without one (or with a stale one) is indexed by reading its record headers.
Element k of the stream is record `epoch_permutation_index(k)` of all
shards, read at its offset, so a stream starts at any position at the same
cost and epochs are globally shuffled without a shuffle buffer.

Reading, parsing and decoding (mtssl.data.graph_decode) are TensorFlow ops
(no Python in the per-example path), so the pipeline runs on tf.data service
workers. Bad records are
counted skips: an empty image, a truncated JPEG/PNG, an unknown format, a
record or image TensorFlow cannot read or decode, a shard deleted since it was
indexed. Counts travel with the elements (mtssl.data.problems).
"""

import glob
import json
import os
import struct
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.python.data.ops import dataset_ops
from tensorflow.python.framework import tensor_spec
from tensorflow.python.ops import gen_dataset_ops

from mtssl.data import graph_decode
from mtssl.data import problems
from mtssl.data import sources
from mtssl.utils import io_utils

IMAGE_KEY = 'image/encoded'
LABEL_KEY = 'image/class/label'
INDEX_SUFFIX = '.index'


# Index -------------------------------------------------------------------
def scan_offsets(path: str) -> Tuple[np.ndarray, int]:
  """Offsets of the complete records of a TFRecord file (headers only), and
  the bytes after the last one."""
  size = os.path.getsize(path)
  offsets = []
  with open(path, 'rb') as f:
    offset = 0
    while offset + 12 <= size:
      f.seek(offset)
      (length,) = struct.unpack('<Q', f.read(8))
      end = offset + 12 + length + 4
      if end > size:
        break
      offsets.append(offset)
      offset = end
  return np.asarray(offsets, np.int64), size - offset


def write_index(shard: str, offsets: np.ndarray) -> None:
  data = np.concatenate([[os.path.getsize(shard)], offsets]).astype('<i8')
  io_utils.atomic_write_bytes(shard + INDEX_SUFFIX, data.tobytes())


def load_offsets(shard: str, keep: bool = False) -> Tuple[np.ndarray, int]:
  """(offsets, trailing bytes): from the index file when it matches the shard,
  else from the record headers; `keep` writes that index beside a complete
  shard for the next reader (where the folder is writable)."""
  path = shard + INDEX_SUFFIX
  if os.path.isfile(path):
    data = np.fromfile(path, '<i8')
    if data.size and data[0] == os.path.getsize(shard):
      return data[1:].astype(np.int64), 0
  offsets, trailing = scan_offsets(shard)
  if keep and not trailing:
    try:
      write_index(shard, offsets)
    except OSError:
      pass  # A read-only dataset folder: scanned again next time.
  return offsets, trailing


def find_shards(spec: str) -> List[str]:
  """TFRecord shards of a glob, or of a directory (every file not ending in
  .index or .json and not hidden)."""
  path = os.path.expanduser(spec)
  files = (glob.glob(os.path.join(path, '*')) if os.path.isdir(path)
           else glob.glob(path))
  return sorted(f for f in files if os.path.isfile(f)
                and not os.path.basename(f).startswith('.')
                and not f.endswith((INDEX_SUFFIX, '.json', '.tmp')))


# Graph-only reading and decoding -------------------------------------------
class _RecordAt(dataset_ops.DatasetSource):
  """The records of `filenames` from `byte_offsets` (TFRecordDatasetV2).

  Only valid inside a dataset function (flat_map, interleave): TensorFlow
  2.20 does not serialize this op's byte_offsets input at the top level.
  """

  def __init__(self, filenames, byte_offsets):
    self._name = None
    variant = gen_dataset_ops.tf_record_dataset_v2(
        filenames, '', tf.constant(0, tf.int64), byte_offsets,
        metadata=self._metadata.SerializeToString())
    super().__init__(variant)

  @property
  def element_spec(self):
    return tensor_spec.TensorSpec([], tf.string)


def read_record(filename, offset) -> tf.data.Dataset:
  """At most one record: the one at `offset`; none if the file is gone."""
  files = tf.io.matching_files(graph_decode.literal_glob(filename))
  return _RecordAt(files, tf.fill(tf.shape(files), offset)).take(1)


def parse_image(record, image_key: str = IMAGE_KEY) -> tf.Tensor:
  return tf.io.parse_single_example(record, {
      image_key: tf.io.FixedLenFeature([], tf.string, default_value=''),
  })[image_key]


def decoded_record(filename, offset, image_key: str = IMAGE_KEY,
                   max_pixels: Optional[int] = None) -> tf.data.Dataset:
  """One (uint8 [H, W, 3], status): the record's image, or a skip status
  (CORRUPT for a record that cannot be read or parsed)."""
  return graph_decode.fallback(read_record(filename, offset).map(
      lambda record: graph_decode.decode_checked(
          parse_image(record, image_key), max_pixels)), sources.CORRUPT)


class TfrecordImageSource(sources.ImageSource):
  """Images of tf.train.Example shards, read by record index in graph ops.

  `files` (a list of TFRecord files, read in that order) replaces the glob
  `path`, and `ranges` (one (skip, take) per file, take < 0: to the end)
  keeps part of each; `image_key` names the feature holding the encoded
  image; `name` defaults to tfrecord:PATH.
  """

  def __init__(self, path: str, cycle_length: int = 16,
               files: Optional[List[str]] = None,
               image_key: str = IMAGE_KEY, name: Optional[str] = None,
               ranges: Optional[List[Tuple[int, int]]] = None):
    super().__init__(name or f'tfrecord:{path}')
    self.path = path
    self.cycle_length = cycle_length
    self.image_key = image_key
    self._files = files
    self._ranges = ranges
    self.counter = problems.ProblemCounter(self.name)
    self._index: Optional[Tuple[List[str], np.ndarray, np.ndarray]] = None

  @property
  def index(self):
    """(shard files, file id per record, byte offset per record)."""
    if self._index is None:
      files = self._files or find_shards(self.path)
      if not files:
        raise sources.DataSourceError(
            f'No TFRecord shards at {self.path!r} (a directory or a glob). '
            f'Make them from a folder with tools/make_shards.py.')
      ids, offsets = [], []
      for fid, shard in enumerate(files):
        found, trailing = load_offsets(shard, keep=self._files is not None)
        if trailing:
          self.counter.add('truncated_shard')
        if self._ranges:
          skip, take = self._ranges[fid]
          found = found[skip:] if take < 0 else found[skip:skip + take]
        ids.append(np.full(found.shape, fid, np.int32))
        offsets.append(found)
      self._index = (files, np.concatenate(ids), np.concatenate(offsets))
    return self._index

  def __len__(self):
    return int(self.index[2].shape[0])

  def epoch_size(self):
    return len(self)

  def validate(self):
    if not len(self):  # pylint: disable=g-explicit-length-test
      raise sources.DataSourceError(
          f'The shards at {self.path!r} ({len(self.index[0])} files) hold no '
          f'complete record.')

  def counted_images(self, seed, start=0) -> tf.data.Dataset:
    """Endless (index, uint8 [H, W, 3], int64 counts [MAX_REASONS]) from
    `start`; counts hold this element's decode status and the skips just
    before it."""
    self.validate()
    self._arm_counter()
    files, file_ids, offsets = self.index
    files = tf.constant(files)
    file_ids = tf.constant(file_ids)
    offsets = tf.constant(offsets)
    max_pixels = self.max_image_pixels
    return problems.counted_stream(
        self, seed, start, lambda i: decoded_record(
            files[file_ids[i]], offsets[i], self.image_key, max_pixels),
        self.cycle_length)

  def images(self, seed, start=0):
    """(index, image); counts go to the counter through numpy_function (use
    `counted_images` where no Python may run)."""
    return problems.count_with(self.counter,
                               self.counted_images(seed, start))


# Writing shards -------------------------------------------------------------
def serialize_image(encoded: bytes, label: Optional[int] = None) -> bytes:
  feature = {IMAGE_KEY: tf.train.Feature(
      bytes_list=tf.train.BytesList(value=[encoded]))}
  if label is not None:
    feature[LABEL_KEY] = tf.train.Feature(
        int64_list=tf.train.Int64List(value=[int(label)]))
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


def shard_name(i: int, n: int) -> str:
  return f'shard-{i:05d}-of-{n:05d}.tfrecord'


def _check_file(path: str) -> Tuple[Optional[bytes], str]:
  """(file bytes, 'ok') or (None, skip reason)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError:
    return None, 'skipped_unreadable'
  _, status = sources.decode_image_bytes(data)
  if status in sources.SKIPPED:
    return None, sources.STATUS_NAMES[status]
  return data, 'ok'


def make_shards(folder: str, output: str, records_per_shard: int = 1024,
                seed: int = 0, labels: bool = True,
                log=print) -> dict:
  """Writes the images below `folder` as shards in `output`; returns the summary.

  Files are shuffled by `seed` and cut into shards of `records_per_shard`
  files. A shard (and its index) is written under a temporary name and
  renamed, its counts beside it (SHARD.json); a rerun with the same arguments
  keeps the shards already there. Undecodable files are skipped by reason.
  Labels are the sorted first-level subfolder names (`classes` in the
  summary), when every image lies in one.
  """
  if not os.path.isdir(folder):
    raise sources.DataSourceError(f'Image folder {folder!r} does not exist.')
  if records_per_shard <= 0:
    raise ValueError(f'records_per_shard must be positive, got '
                     f'{records_per_shard}.')
  files = sources.list_image_files(folder)
  if not files:
    raise sources.DataSourceError(f'Image folder {folder!r} contains no image '
                                  f'files ({", ".join(sources.IMAGE_EXTENSIONS)}).')
  rel = [os.path.relpath(f, folder) for f in files]
  classes = sorted({r.split(os.sep)[0] for r in rel})
  labelled = labels and all(os.sep in r for r in rel)
  class_id = {c: i for i, c in enumerate(classes)} if labelled else {}
  order = np.random.default_rng(seed).permutation(len(files))
  n = (len(files) + records_per_shard - 1) // records_per_shard
  os.makedirs(output, exist_ok=True)
  written = kept = 0
  skipped = {}
  records = 0
  for i in range(n):
    shard = os.path.join(output, shard_name(i, n))
    stats_path = shard + '.json'
    if not (os.path.isfile(shard) and os.path.isfile(shard + INDEX_SUFFIX)
            and os.path.isfile(stats_path)):
      chunk = order[i * records_per_shard:(i + 1) * records_per_shard]
      serialized, reasons = [], {}
      for j in chunk:
        data, reason = _check_file(files[j])
        if data is None:
          reasons[reason] = reasons.get(reason, 0) + 1
          continue
        label = class_id.get(rel[j].split(os.sep)[0]) if labelled else None
        serialized.append(serialize_image(data, label))

      def _write(name, serialized=serialized):
        with tf.io.TFRecordWriter(name) as writer:
          for record in serialized:
            writer.write(record)

      io_utils.atomic_write_with(shard, _write)
      offsets, _ = scan_offsets(shard)
      write_index(shard, offsets)
      io_utils.atomic_write_json(stats_path, {'records': len(serialized),
                                              'skipped': reasons})
      written += 1
      log(f'{shard}: {len(serialized)} records'
          + (f', skipped {reasons}' if reasons else ''))
    else:
      kept += 1
    with open(stats_path) as f:
      stats = json.load(f)
    records += stats['records']
    for reason, count in stats['skipped'].items():
      skipped[reason] = skipped.get(reason, 0) + count
  summary = {
      'folder': os.path.abspath(folder), 'output': os.path.abspath(output),
      'files': len(files), 'records': records, 'shards': n,
      'records_per_shard': records_per_shard, 'seed': seed,
      'shards_written': written, 'shards_kept': kept, 'skipped': skipped,
      'classes': classes if labelled else None,
  }
  io_utils.atomic_write_json(os.path.join(output, 'summary.json'), summary)
  return summary

