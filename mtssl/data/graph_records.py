"""The object graph on disk: sharded TFRecords with random access to nodes.

A graph directory holds `nodes-*.tfrecord` (patches), `table-*.tfrecord`
(node table), `edges-*.tfrecord` and `summary.json`, assembled in a
temporary directory and renamed, so one that exists is complete. A node's
patch is read by its record offset (mtssl.data.motion_records.index_records).
"""

import json
import os
from typing import Dict, Optional, Sequence

import cv2
import numpy as np
import tensorflow as tf

from mtssl.utils import io_utils
from mtssl.data import object_graph
from mtssl.data import motion_records as records

NODES_PER_SHARD = 4096
ROWS_PER_CHUNK = 65536
_TABLE_COLUMNS = ('track', 'role', 'parent', 'identity', 'category')


def _int_list(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(
      value=np.asarray(values, np.int64).tolist()))


def _example(feature) -> bytes:
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString()


def encode_patch(patch: np.ndarray) -> bytes:
  ok, data = cv2.imencode('.png', cv2.cvtColor(patch, cv2.COLOR_RGB2BGR))
  if not ok:
    raise ValueError(f'Cannot encode a patch of shape {patch.shape}.')
  return data.tobytes()


def decode_patch(data: bytes) -> Optional[np.ndarray]:
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _chunks(columns: Dict[str, np.ndarray], n: int):
  for first in range(0, max(n, 1), ROWS_PER_CHUNK):
    yield first, {k: v[first:first + ROWS_PER_CHUNK] for k, v in columns.items()}


def write_graph(graph: object_graph.Graph, path: str,
                summary: Optional[dict] = None, overwrite: bool = False
                ) -> None:
  """Writes `graph` (with its patches) to the directory `path`, atomically."""
  if graph.patches is None:
    raise ValueError('write_graph needs a graph with its patches in memory.')
  with io_utils.atomic_directory(path, overwrite=overwrite) as tmp:
    n = graph.num_nodes
    for shard, first in enumerate(range(0, n, NODES_PER_SHARD)):
      recs = [_example({
          'node': _int_list([i]),
          'patch': tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[encode_patch(graph.patches[i])])),
      }) for i in range(first, min(first + NODES_PER_SHARD, n))]
      records.write_shard(os.path.join(tmp, f'nodes-{shard:05d}.tfrecord'),
                          recs)
    table = {k: getattr(graph, k) for k in _TABLE_COLUMNS}
    recs = [_example(dict({'first': _int_list([first])},
                          **{k: _int_list(v) for k, v in cols.items()}))
            for first, cols in _chunks(table, n)]
    records.write_shard(os.path.join(tmp, 'table-00000.tfrecord'), recs)
    edges = {'a': graph.edges[:, 0], 'b': graph.edges[:, 1],
             'type': graph.edge_type}
    recs = [_example({k: _int_list(v) for k, v in cols.items()})
            for _, cols in _chunks(edges, len(graph.edge_type))]
    records.write_shard(os.path.join(tmp, 'edges-00000.tfrecord'), recs)
    io_utils.atomic_write_bytes(
        os.path.join(tmp, 'summary.json'),
        json.dumps(summary if summary is not None else graph.summary(),
                   indent=1, sort_keys=True).encode('utf-8'))


def _read_chunks(files: Sequence[str], names: Sequence[str]):
  out = {k: [] for k in names}
  for path in files:
    for data in tf.data.TFRecordDataset(path).as_numpy_iterator():
      feature = tf.train.Example.FromString(data).features.feature
      for k in names:
        out[k].append(np.asarray(feature[k].int64_list.value, np.int64))
  return {k: np.concatenate(v) if v else np.zeros([0], np.int64)
          for k, v in out.items()}


class NodeStore:
  """Random access to the node patches of a graph directory."""

  def __init__(self, path: str):
    self.files = sorted(tf.io.gfile.glob(os.path.join(path, 'nodes-*.tfrecord')))
    self.index = records.index_records(self.files)

  def __len__(self):
    return len(self.index)

  def patch(self, node: int) -> Optional[np.ndarray]:
    """The node's uint8 RGB patch, or None if its record is unreadable."""
    try:
      data = records.read_record(self.files[int(self.index.file_ids[node])],
                                 int(self.index.offsets[node]))
      feature = tf.train.Example.FromString(data).features.feature
      if feature['node'].int64_list.value[0] != node:
        return None
      return decode_patch(feature['patch'].bytes_list.value[0])
    except Exception:  # pylint: disable=broad-except
      return None


def read_graph(path: str):
  """(Graph without patches, NodeStore) of a graph directory.

  Raises GraphError naming the directory when it is not a complete graph.
  """
  if not os.path.isdir(path):
    raise object_graph.GraphError(
        f'No graph directory at {path!r}; build one from a folder of videos '
        f'with tools/build_object_graph.py.')
  store = NodeStore(path)
  table_files = sorted(tf.io.gfile.glob(os.path.join(path, 'table-*.tfrecord')))
  edge_files = sorted(tf.io.gfile.glob(os.path.join(path, 'edges-*.tfrecord')))
  if not store.files or not table_files or not edge_files:
    raise object_graph.GraphError(
        f'{path!r} is not a graph directory (needs nodes-*, table-* and '
        f'edges-*.tfrecord files).')
  table = _read_chunks(table_files, ('first',) + _TABLE_COLUMNS)
  edges = _read_chunks(edge_files, ('a', 'b', 'type'))
  n = len(table['track'])
  if len(store) != n:
    raise object_graph.GraphError(
        f'{path!r}: {len(store)} node records for {n} rows of the node table.')
  graph = object_graph.Graph(
      None, table['track'].astype(np.int32), table['role'].astype(np.int8),
      table['parent'].astype(np.int32), table['identity'],
      table['category'].astype(np.int32),
      np.stack([edges['a'], edges['b']], axis=1).astype(np.int32),
      edges['type'].astype(np.int8))
  if len(graph.edges) and (graph.edges.min() < 0 or graph.edges.max() >= n):
    raise object_graph.GraphError(f'{path!r}: an edge names a node outside '
                                  f'0..{n - 1}.')
  return graph, store
