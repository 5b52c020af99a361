"""The motion-label TFRecord format: writing shards, indexing and reading records.

One `tf.train.Example` per labelled frame (schema: README, "Extracting labels
from a folder of videos"). Shards are written atomically; `index_records`
reads only the record headers, so `decoded_example` (graph ops) fetches
record k directly.
"""

import dataclasses
import glob
import os
import struct
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf

from mtssl.utils import io_utils
from mtssl.data import graph_decode
from mtssl.data import image_records
from mtssl.data import sources

SHARD_PATTERN = 'shard-{:05d}.tfrecord'
SHARD_GLOB = 'shard-*.tfrecord'

# Skip reasons counted when reading.
BAD_RECORD = 'ms_skipped_bad_record'
BAD_FRAME = 'ms_skipped_bad_frame'
BAD_LABEL = 'ms_skipped_bad_label'


def _bytes(value: bytes):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def serialize_example(frame: bytes, label: np.ndarray, height: int, width: int,
                      video: str, frame_index: int, foreground: float) -> bytes:
  """A serialized tf.train.Example of the schema above."""
  label = np.asarray(label, np.uint8)
  if label.ndim != 2:
    raise ValueError(f'label must be 2-D, got shape {label.shape}.')
  feature = {
      'frame': _bytes(frame),
      'label': _bytes(label.tobytes()),
      'height': _int(height),
      'width': _int(width),
      'label_height': _int(label.shape[0]),
      'label_width': _int(label.shape[1]),
      'video': _bytes(video.encode('utf-8')),
      'frame_index': _int(frame_index),
      'foreground': tf.train.Feature(
          float_list=tf.train.FloatList(value=[float(foreground)])),
  }
  # Deterministic: map entries sorted by key. Otherwise their order varies
  # between processes, and so would the bytes of a rerun's shards.
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString(deterministic=True)


def write_shard(path: str, records: Sequence[bytes]) -> None:
  """Writes serialized records to a TFRecord file, atomically."""

  def write(name):
    with tf.io.TFRecordWriter(name) as writer:
      for record in records:
        writer.write(record)

  io_utils.atomic_write_with(path, write)


def find_shards(spec: str) -> List[str]:
  """Shard files of a directory (its *.tfrecord files) or a glob pattern."""
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    files = glob.glob(os.path.join(path, '*.tfrecord'))
  else:
    files = glob.glob(path)
  return sorted(f for f in files if os.path.isfile(f)
                and not os.path.basename(f).startswith('.'))


@dataclasses.dataclass
class RecordIndex:
  files: List[str]
  file_ids: np.ndarray     # int32 [N]
  offsets: np.ndarray      # int64 [N] byte offset of each record's header
  truncated: Dict[str, int]  # file -> bytes after its last complete record

  def __len__(self):
    return int(self.offsets.shape[0])


def index_records(files: Sequence[str]) -> RecordIndex:
  """Offsets of every complete record in TFRecord files (headers only)."""
  file_ids, offsets, truncated = [], [], {}
  for fid, path in enumerate(files):
    found, trailing = image_records.scan_offsets(path)
    file_ids += [fid] * len(found)
    offsets += found.tolist()
    if trailing:
      truncated[path] = trailing
  return RecordIndex(list(files), np.asarray(file_ids, np.int32),
                     np.asarray(offsets, np.int64), truncated)


def read_record(path: str, offset: int) -> bytes:
  with open(path, 'rb') as f:
    f.seek(offset)
    (length,) = struct.unpack('<Q', f.read(8))
    f.seek(offset + 12)
    return f.read(length)


def parse_example(data: bytes) -> Dict[str, object]:
  """The fields of a serialized example (frame left encoded)."""
  feature = tf.train.Example.FromString(data).features.feature

  def one(name, kind):
    values = getattr(feature[name], kind).value
    if len(values) != 1:
      raise ValueError(f'feature {name!r} has {len(values)} values')
    return values[0]

  return {
      'frame': one('frame', 'bytes_list'),
      'label': one('label', 'bytes_list'),
      'label_height': int(one('label_height', 'int64_list')),
      'label_width': int(one('label_width', 'int64_list')),
      'video': one('video', 'bytes_list').decode('utf-8', 'replace'),
      'frame_index': int(one('frame_index', 'int64_list')),
  }


_SPEC = {
    'frame': tf.io.FixedLenFeature([], tf.string),
    'label': tf.io.FixedLenFeature([], tf.string),
    'label_height': tf.io.FixedLenFeature([], tf.int64),
    'label_width': tf.io.FixedLenFeature([], tf.int64),
    'video': tf.io.FixedLenFeature([], tf.string),
    'frame_index': tf.io.FixedLenFeature([], tf.int64),
}


def _placeholder(code) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensors((tf.zeros([1, 1, 3], tf.uint8),
                                       tf.zeros([1, 1], tf.uint8),
                                       tf.constant(code, tf.int64)))


def decoded_example(filename, offset, codes: Dict[str, int]) -> tf.data.Dataset:
  """One (uint8 frame, uint8 label, status code) of the record at `offset`,
  in graph ops: `read_example`'s result, with `codes` numbering its skip
  reasons (BAD_RECORD, BAD_FRAME, BAD_LABEL) and decode statuses keeping
  theirs."""

  def _parse(record):
    fields = tf.io.parse_single_example(record, _SPEC)
    return (fields['frame'], fields['label'], fields['label_height'],
            fields['label_width'], tf.constant(True))

  def _decode(frame, label, height, width):
    status = graph_decode.header_status(frame)
    image, status = tf.cond(
        tf.equal(status, sources.OK), lambda: graph_decode.decode_rgb(frame),
        lambda: (tf.zeros([1, 1, 3], tf.uint8), tf.constant(-1)))
    values = tf.io.decode_raw(label, tf.uint8)
    label_ok = ((height > 0) & (width > 0)
                & tf.equal(tf.size(values, out_type=tf.int64), height * width)
                & (tf.reduce_max(tf.concat([values, [0]], 0)) <= 1))
    label = tf.cond(label_ok, lambda: tf.reshape(values, tf.stack(
        [height, width])), lambda: tf.zeros([1, 1], tf.uint8))
    code = tf.case([(status < 0, lambda: tf.constant(codes[BAD_FRAME], tf.int64)),
                    (~label_ok, lambda: tf.constant(codes[BAD_LABEL], tf.int64))],
                   default=lambda: tf.cast(status, tf.int64))
    return image, label, code

  def _checked(frame, label, height, width, parsed):
    return tf.cond(parsed, lambda: _decode(frame, label, height, width),
                   lambda: (tf.zeros([1, 1, 3], tf.uint8),
                            tf.zeros([1, 1], tf.uint8),
                            tf.constant(codes[BAD_RECORD], tf.int64)))

  # One dataset level, as in graph_decode.decoded_file (a dataset per record
  # inside a flat_map cost every interleave slot 0.2 CPU-s at each start):
  # an unreadable record becomes a marked placeholder before decoding, and a
  # frame TensorFlow cannot decode after all (its error dropped) a bad frame.
  unreadable = tf.data.Dataset.from_tensors(
      (tf.constant(b''), tf.constant(b''), tf.constant(0, tf.int64),
       tf.constant(0, tf.int64), tf.constant(False)))
  parsed = image_records.read_record(filename, offset).map(_parse)
  return parsed.ignore_errors().concatenate(unreadable).take(1).map(
      _checked).ignore_errors().concatenate(
          _placeholder(codes[BAD_FRAME])).take(1)
