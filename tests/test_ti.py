"""Transitive invariance: graph construction, edge precision, records,
pipeline, loss and head (learning and resume: test_ti_training.py)."""

import math
import os

import numpy as np
import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.data import graph_records
from mtssl.data import object_graph
from mtssl.data import sources
from mtssl.tasks import base
from mtssl.tasks import ti
from tests import task_checks

SMALL_HEAD = dict(unit_depths=(32, 16), unit_bottleneck=8, fc_widths=(64, 32))
# 30 clips: about 60 tracks, 4 parents (about 10 s to build).
SMALL_GRAPH = dict(synthetic_clips=30, synthetic_parents=6,
                   synthetic_min_parent_size=8)


def _small_graph():
  return ti.synthetic_graph(0, ti.TiConfig(**SMALL_GRAPH))


def _track(value, identity, category, end_value=None):
  patch = np.full((8, 8, 3), value, np.uint8)
  end = np.full((8, 8, 3), value if end_value is None else end_value, np.uint8)
  return object_graph.Track(patch, end, 'v', 0, (0, 0, 8, 8), (0, 0, 8, 8),
                            identity, category, identity, category)


class GraphTest(tf.test.TestCase):

  def test_child_clusters_are_mutual_top_k_groups(self):
    rng = np.random.default_rng(0)
    centre_a, centre_b = rng.normal(size=16), rng.normal(size=16)
    tight = [centre_a + 0.01 * rng.normal(size=16) for _ in range(4)]
    tight += [centre_b + 0.01 * rng.normal(size=16) for _ in range(4)]
    spread = list(rng.normal(size=(6, 16)))
    features = np.array(tight + spread)
    groups = object_graph.child_clusters(features, neighbours=3, size=4)
    # With top-3, a group of 4 must be exactly each tight set.
    self.assertCountEqual(groups, [(0, 1, 2, 3), (4, 5, 6, 7)])
    self.assertEqual(object_graph.child_clusters(features[:3], 3, 4), [])

  def test_transitivity_and_types(self):
    # Two tracks A -> A', B -> B' whose starts embed identically: one parent,
    # one child cluster of 2 (child_size 2), one inter edge A-B, transitive
    # A-B', A'-B, A'-B'.
    tracks = [_track(10, 0, 1), _track(10, 1, 1)]
    embed = lambda p: np.ones((len(p), 3), np.float32)
    config = object_graph.GraphConfig(patch_size=8, num_parents=1,
                                      min_parent_size=2, neighbours=1,
                                      child_size=2)
    graph = object_graph.build_graph(tracks, embed, config)
    edges = {(int(a), int(b), int(t)) for (a, b), t in
             zip(graph.edges, graph.edge_type)}
    A, A2, B, B2 = 0, 1, 2, 3
    self.assertEqual(edges, {
        (A, A2, object_graph.INTRA), (B, B2, object_graph.INTRA),
        (A, B, object_graph.INTER), (A, B2, object_graph.TRANSITIVE),
        (A2, B, object_graph.TRANSITIVE), (A2, B2, object_graph.TRANSITIVE)})
    summary = graph.summary()
    self.assertEqual((summary['nodes'], summary['parents'],
                      summary['child_clusters']), (4, 1, 1))
    precision = object_graph.edge_precision(graph)
    self.assertEqual(precision['inter']['same_instance'], 0.0)
    self.assertEqual(precision['inter']['same_class'], 1.0)

  def test_bad_graphs_are_named_errors(self):
    embed = lambda p: np.eye(len(p), 4, dtype=np.float32)
    with self.assertRaisesRegex(object_graph.GraphError, 'No tracks'):
      object_graph.build_graph([], embed)
    tracks = [_track(v, v, 0) for v in range(3)]
    with self.assertRaisesRegex(object_graph.GraphError,
                                'min_parent_size=100'):
      object_graph.build_graph(tracks, embed,
                               object_graph.GraphConfig(patch_size=8))
    with self.assertRaisesRegex(object_graph.GraphError, 'child_size'):
      object_graph.GraphConfig(child_size=20).validate()

  def test_synthetic_edge_precision(self):
    graph = _small_graph()
    precision = object_graph.edge_precision(graph)
    categories = graph.category[graph.role == object_graph.START]
    chance = float(np.sum((np.bincount(categories) / len(categories)) ** 2))
    # Measured (30 clips): intra same instance 1.0 (exact tracking), inter
    # and transitive same class 0.63 against 0.31 for random pairs.
    self.assertGreaterEqual(precision['intra']['same_instance'], 0.99)
    self.assertGreater(precision['inter']['same_class'], 0.5)
    self.assertGreater(precision['transitive']['same_class'], 0.5)
    self.assertGreater(precision['inter']['same_class'], chance + 0.15)
    self.assertGreater(precision['transitive']['edges'], 100)


class RecordsAndSourceTest(tf.test.TestCase):

  def test_round_trip_and_pairs(self):
    graph = _small_graph()
    path = os.path.join(self.get_temp_dir(), 'graph')
    graph_records.write_graph(graph, path)
    read, store = graph_records.read_graph(path)
    for name in ('track', 'role', 'parent', 'identity', 'category', 'edges',
                 'edge_type'):
      self.assertAllEqual(getattr(read, name), getattr(graph, name))
    for node in (0, 17, graph.num_nodes - 1):
      self.assertAllEqual(store.patch(node), graph.patches[node])
    task = ti.TransitiveInvarianceTask(ti.TiConfig(batch_size=4))
    on_disk = task.make_source(f'graph:{path}')
    in_memory = ti.PairSource('mem', graph, lambda i: graph.patches[i], 96,
                              7 / 9)
    a = task_checks.take(task.make_dataset(on_disk, 4, seed=3), 2)
    b = task_checks.take(task.make_dataset(in_memory, 4, seed=3), 2)
    task_checks.assert_same_structure_values(self, a, b)

  def test_bad_sources(self):
    task = ti.TransitiveInvarianceTask()
    with self.assertRaisesRegex(sources.DataSourceError, 'No graph directory'):
      task.make_source('graph:/nonexistent/graph')
    empty = self.get_temp_dir()
    with self.assertRaisesRegex(sources.DataSourceError, 'not a graph'):
      task.make_source(f'graph:{empty}')
    with self.assertRaisesRegex(sources.DataSourceError, 'Unknown ti source'):
      task.make_source('folder:/x')
    graph = _small_graph()
    one_parent = object_graph.Graph(
        graph.patches, graph.track, graph.role, np.zeros_like(graph.parent),
        graph.identity, graph.category, graph.edges, graph.edge_type)
    with self.assertRaisesRegex(sources.DataSourceError, '1 parent'):
      ti.PairSource('x', one_parent, None, 96, 0.5).validate()
    no_pairs = object_graph.Graph(
        graph.patches, graph.track, graph.role, graph.parent, graph.identity,
        graph.category, graph.edges[:0], graph.edge_type[:0])
    with self.assertRaisesRegex(sources.DataSourceError, 'no intra'):
      ti.PairSource('x', no_pairs, None, 96, 0.5).validate()


class PipelineTest(tf.test.TestCase):

  def test_triplets_deterministic_resumable(self):
    task = ti.TransitiveInvarianceTask(ti.TiConfig(batch_size=6,
                                                   **SMALL_GRAPH))
    source = task.make_source('synthetic')
    graph = source.graph
    first = task_checks.take(task.make_dataset(source, 6, seed=5), 2)
    again = task_checks.take(task.make_dataset(source, 6, seed=5), 2)
    resumed = task_checks.take(task.make_dataset(source, 6, seed=5, start=6), 1)
    for x, y in zip(first, again):
      task_checks.assert_same_structure_values(self, x, y)
    task_checks.assert_same_structure_values(self, resumed[0], first[1])
    features, labels = first[0]
    self.assertEqual(features['patches'].shape, (6, 3, 96, 96, 3))
    kinds = {object_graph.INTRA, object_graph.TRANSITIVE}
    edges = {(int(a), int(b)) for a, b in graph.edges}
    for i in range(6):
      a, b = features['nodes'][i]
      self.assertIn(int(labels['edge_type'][i]), kinds)
      self.assertTrue((a, b) in edges or (b, a) in edges)
      self.assertEqual(features['parent'][i], graph.parent[a])
      if labels['valid'][i]:
        self.assertNotEqual(labels['negative_parent'][i], graph.parent[a])
        self.assertNotEqual(graph.parent[labels['negative_node'][i]],
                            graph.parent[a])
    views = task.image_summaries(features, labels, None)['ti/triplets']
    self.assertEqual(views.shape, (6, 96, 288, 3))

  def test_transitive_fraction(self):
    graph = _small_graph()
    for fraction in (0.0, 1.0, 7 / 9):
      source = ti.PairSource('x', graph, None, 96, fraction)
      kinds = np.array([source.draw(0, k)[0] for k in range(900)])
      share = np.mean(kinds == object_graph.TRANSITIVE)
      self.assertAllClose(share, fraction, atol=0.05)

  def test_distractor_from_another_parent(self):
    patches = tf.reshape(tf.range(5 * 2, dtype=tf.float32), [5, 2, 1, 1, 1])
    features = {'patches': patches, 'parent': tf.constant([0, 0, 1, 0, 2]),
                'nodes': tf.constant([[10, 11], [20, 21], [30, 31], [40, 41],
                                      [50, 51]], tf.int64)}
    out, labels = ti.arrange_triplets(features, {})
    # Example 0 (parent 0): next examples 1 (parent 0), 2 (parent 1) -> 2.
    self.assertAllEqual(labels['negative_node'], [30, 30, 40, 50, 10])
    self.assertAllEqual(labels['valid'], [1, 1, 1, 1, 1])
    self.assertAllEqual(out['patches'][:, 2, 0, 0, 0], [4, 4, 6, 8, 0])
    same = dict(features, parent=tf.zeros([5], tf.int32))
    _, labels = ti.arrange_triplets(same, {})
    self.assertAllEqual(labels['valid'], [0, 0, 0, 0, 0])

  def test_registry_and_config(self):
    self.assertIs(base.get_task_class('ti'), ti.TransitiveInvarianceTask)
    with self.assertRaisesRegex(ValueError, 'batch_size'):
      base.make_task('ti', batch_size=1)
    with self.assertRaisesRegex(ValueError, 'transitive_fraction'):
      ti.TiConfig(transitive_fraction=1.5).validate()
    cpu = configs.cpu_config(['ti']).tasks['ti'].config
    self.assertEqual(cpu.fc_widths, (256, 128))


class LossTest(tf.test.TestCase):

  def test_hand_computed(self):
    s = 1 / math.sqrt(2)
    embeddings = tf.constant([
        # D+ = 1 - 1/sqrt(2), D- = 1: max(0.29289 - 1 + 0.5, 0) = 0
        [[1, 0, 0], [1, 1, 0], [0, 1, 0]],
        # D+ = 1, D- = 0: 1.5
        [[1, 0, 0], [0, 3, 0], [2, 0, 0]],
        # D+ = 1, D- = 1 - 1/sqrt(2): 0.5 + 1/sqrt(2)
        [[2, 0, 0], [0, 0, 5], [1, 1, 0]],
    ], tf.float32)
    task = ti.TransitiveInvarianceTask()
    labels = {'valid': tf.constant([1.0, 1.0, 1.0]),
              'edge_type': tf.constant([0, 2, 2])}
    self.assertAllClose(task.loss(labels, embeddings), (1.5 + 0.5 + s) / 3,
                        atol=1e-6)
    # A triplet without a distractor counts for nothing.
    labels['valid'] = tf.constant([1.0, 0.0, 1.0])
    self.assertAllClose(task.loss(labels, embeddings), (0.5 + s) / 2,
                        atol=1e-6)
    metrics = task.build_metrics()
    task.update_metrics(metrics, labels, embeddings)
    self.assertAllClose(metrics['triplet_accuracy'].result(), 0.5)
    self.assertAllClose(metrics['positive_distance_intra'].result(), 1 - s)
    self.assertAllClose(metrics['positive_distance_transitive'].result(), 1.0)
    self.assertAllClose(metrics['negative_distance'].result(),
                        (1 + 1 - s) / 2)
    self.assertAllClose(metrics['with_distractor'].result(), 2 / 3)

  def test_head_shapes(self):
    task = ti.TransitiveInvarianceTask(ti.TiConfig(**SMALL_HEAD))
    head = task.build_head()
    out = head(tf.zeros([6, 12, 12, 64]), training=False)
    self.assertEqual(out.shape, (2, 3, 32))
    self.assertEqual(head.fc[0].kernel.shape, (3 * 3 * 16, 64))
    paper = ti.TiConfig()
    self.assertEqual(paper.fc_widths, (4096, 1024))


if __name__ == '__main__':
  tf.test.main()
