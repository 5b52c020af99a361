"""Transitive invariance (Wang, He & Gupta 2017) as a task.

A Triplet-Siamese network on 96x96 object patches: positive pairs are edges
of the object graph (mtssl.data.object_graph), negatives an anchor of another
parent cluster in the batch; loss max(0, D(X, X+) - D(X, X-) + 0.5),
D = 1 - cos. Sources `synthetic` or `graph:/dir`. Departures: BUILD.md,
"Transitive invariance".
"""

import dataclasses
import threading
from typing import Dict, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.ops import preprocessing
from mtssl.backbones import slim_layers
from mtssl.data import graph_records
from mtssl.data import object_graph
from mtssl.data import sources
from mtssl.tasks import base
from mtssl.tasks import ex
from mtssl.tasks import heads
from mtssl.tasks import patches

MARGIN = 0.5
PAPER_FC_WIDTHS = (4096, 1024)
_SALT = 0x5449  # 'TI'
BAD_PATCH = 'ti_skipped_bad_patch'
NO_DISTRACTOR = 'ti_no_distractor'


def _field(default, help_text):
  return dataclasses.field(default=default, metadata={'help': help_text})


@dataclasses.dataclass
class TiConfig(base.TaskConfig):
  """Transitive-invariance settings; defaults are the paper's."""
  patch_size: int = _field(96, 'side of the object patches fed to the trunk')
  transitive_fraction: float = _field(
      7 / 9, 'fraction of positive pairs that are transitive (the rest are '
      'intra-instance); paper 7 M of 9 M')
  margin: float = _field(MARGIN, 'ranking-loss margin m (paper 0.5)')
  fc_widths: Tuple[int, ...] = _field(
      PAPER_FC_WIDTHS, 'fully connected layers on the patch features')
  unit_depths: Tuple[int, ...] = _field(
      heads.PAPER_UNIT_DEPTHS, 'depths of the strided residual units per patch')
  unit_bottleneck: int = _field(heads.PAPER_UNIT_BOTTLENECK,
                                'bottleneck of those units')
  weight_decay: float = _field(1e-4, 'L2 weight decay of the head')
  synthetic_clips: int = _field(
      60, 'synthetic source: clips of the synthetic video mined for tracks')
  synthetic_parents: int = _field(
      6, 'synthetic source: k-means K of the first clustering stage')
  synthetic_min_parent_size: int = _field(
      8, 'synthetic source: smallest parent cluster kept')

  def validate(self):
    super().validate()
    if self.batch_size < 2:
      raise ValueError(f'ti batch_size must be at least 2 (the distractor '
                       f'comes from another example of the batch), got '
                       f'{self.batch_size}.')
    if not 0 <= self.transitive_fraction <= 1:
      raise ValueError(f'ti transitive_fraction must be in [0, 1], got '
                       f'{self.transitive_fraction}.')
    if self.margin < 0:
      raise ValueError(f'ti margin must be >= 0, got {self.margin}.')
    for name in ('fc_widths', 'unit_depths'):
      values = getattr(self, name)
      if not values or min(values) <= 0:
        raise ValueError(f'ti {name} must be positive, got {values}.')
    for name in ('patch_size', 'synthetic_clips', 'synthetic_parents',
                 'synthetic_min_parent_size'):
      if getattr(self, name) <= 0:
        raise ValueError(f'ti {name} must be positive, got '
                         f'{getattr(self, name)}.')


# Sources ---------------------------------------------------------------------
class PairSource:
  """Positive pairs of an object graph, position-addressed: element k is
  (k, anchor, positive, anchor's parent, edge type, the two node ids)."""

  def __init__(self, name, graph: object_graph.Graph, read_patch,
               patch_size: int, transitive_fraction: float):
    self.name = name
    self.graph = graph
    self.read_patch = read_patch
    self.patch_size = patch_size
    self.transitive_fraction = transitive_fraction
    self.counter = sources.SkipCounter(name)
    self.pools = {kind: graph.edges_of(kind)
                  for kind in (object_graph.INTRA, object_graph.TRANSITIVE)}

  def validate(self):
    n_intra = len(self.pools[object_graph.INTRA])
    n_trans = len(self.pools[object_graph.TRANSITIVE])
    if not n_intra + n_trans:
      raise sources.DataSourceError(
          f'{self.name}: the graph has no intra-instance or transitive edge '
          f'(nothing to train on).')
    parents = np.unique(self.graph.parent[self.graph.parent >= 0])
    if len(parents) < 2:
      raise sources.DataSourceError(
          f'{self.name}: the graph has {len(parents)} parent cluster(s); '
          f'distractors need at least 2.')

  def __repr__(self):
    return f'PairSource({self.name!r})'

  def draw(self, seed: int, k: int):
    """(edge type, node a, node b) of element k."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, int(k), _SALT])
    trans = self.pools[object_graph.TRANSITIVE]
    intra = self.pools[object_graph.INTRA]
    use_trans = len(trans) and (rng.random() < self.transitive_fraction
                                or not len(intra))
    kind = object_graph.TRANSITIVE if use_trans else object_graph.INTRA
    pool = trans if use_trans else intra
    a, b = pool[rng.integers(len(pool))]
    if rng.random() < 0.5:
      a, b = b, a
    return kind, int(a), int(b)

  def pairs(self, seed: int, start: int = 0) -> tf.data.Dataset:
    self.validate()
    p = self.patch_size
    empty = np.zeros((p, p, 3), np.uint8)

    def _read(k):
      kind, a, b = self.draw(seed, k)
      pa, pb = self.read_patch(a), self.read_patch(b)
      ok = all(x is not None and x.shape == (p, p, 3) for x in (pa, pb))
      if not ok:
        self.counter.add(BAD_PATCH)
        pa, pb = empty, empty
      return (pa, pb, np.int32(self.graph.parent[a]), np.int32(kind),
              np.array([a, b], np.int64), ok)

    def _map(k):
      out = tf.numpy_function(
          _read, [k], [tf.uint8, tf.uint8, tf.int32, tf.int32, tf.int64,
                       tf.bool], stateful=True)  # counts bad patches
      for t, shape in zip(out, [[p, p, 3], [p, p, 3], [], [], [2], []]):
        t.set_shape(shape)
      return (k,) + tuple(out)

    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(
        tf.autograph.experimental.do_not_convert(_map),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda *e: e[-1])
    return ds.map(lambda *e: e[:-1])


_SYNTHETIC_CACHE = {}
_CACHE_LOCK = threading.Lock()


def synthetic_graph(seed: int, config: TiConfig) -> object_graph.Graph:
  """The built-in graph (cached per process and settings)."""
  key = (seed, config.synthetic_clips, config.synthetic_parents,
         config.synthetic_min_parent_size, config.patch_size)
  with _CACHE_LOCK:
    if key not in _SYNTHETIC_CACHE:
      graph_config = object_graph.GraphConfig(
          patch_size=config.patch_size, num_parents=config.synthetic_parents,
          min_parent_size=config.synthetic_min_parent_size, seed=seed)
      counts = {}
      tracks = object_graph.synthetic_tracks(seed, config.synthetic_clips,
                                             config=graph_config,
                                             counts=counts)
      _SYNTHETIC_CACHE[key] = object_graph.build_graph(
          tracks, object_graph.color_hog_features, graph_config, counts)
    return _SYNTHETIC_CACHE[key]


def make_pair_source(spec: str, config: TiConfig) -> PairSource:
  """`synthetic` or `graph:/dir` (see the module docstring)."""
  if not spec or spec == 'synthetic':
    try:
      graph = synthetic_graph(0, config)
    except object_graph.GraphError as e:
      raise sources.DataSourceError(f'synthetic object graph: {e}') from None
    return PairSource('synthetic_graph', graph, lambda i: graph.patches[i],
                      config.patch_size, config.transitive_fraction)
  kind, _, rest = spec.partition(':')
  if kind == 'graph' and rest:
    try:
      graph, store = graph_records.read_graph(rest)
    except object_graph.GraphError as e:
      raise sources.DataSourceError(str(e)) from None
    return PairSource(spec, graph, store.patch, config.patch_size,
                      config.transitive_fraction)
  raise sources.DataSourceError(
      f'Unknown ti source {spec!r}: use "synthetic" or "graph:/dir" (a graph '
      f'built by tools/build_object_graph.py).')


# Head ------------------------------------------------------------------------
class TransitiveHead(tf_keras.Model):
  """Per patch: strided residual units, flattened, fully connected layers.

  Called on [group * B, h, w, C] example-major; returns [B, group, D].
  """

  def __init__(self, group: int = 3, unit_depths=heads.PAPER_UNIT_DEPTHS,
               unit_bottleneck=heads.PAPER_UNIT_BOTTLENECK,
               fc_widths=PAPER_FC_WIDTHS,
               weight_decay=slim_layers.WEIGHT_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.group = group
    self.units = heads.patch_units(tuple(unit_depths), unit_bottleneck,
                                   weight_decay)
    self.flatten = tf_keras.layers.Flatten()
    widths = tuple(int(w) for w in fc_widths)
    self.fc = [tf_keras.layers.Dense(
        width, activation='relu' if i + 1 < len(widths) else None,
        kernel_initializer=slim_layers.SlimVarianceScaling(),
        kernel_regularizer=slim_layers.slim_l2(weight_decay) if weight_decay
        else None, dtype='float32' if i + 1 == len(widths) else None,
        name=f'fc{i + 1}') for i, width in enumerate(widths)]

  def call(self, features, training=None):
    x = features
    for unit in self.units:
      x = unit(x, training=training)
    x = self.flatten(x)
    for layer in self.fc:
      x = layer(x)
    return tf.reshape(tf.cast(x, tf.float32), [-1, self.group, x.shape[-1]])


# Task ------------------------------------------------------------------------
def arrange_triplets(features, labels):
  """Batch-level: the distractor of example i is the anchor of the first
  example after it (cyclically) from another parent cluster."""
  parent = features['parent']
  b = tf.shape(parent)[0]
  offset = tf.math.floormod(tf.range(b)[None, :] - tf.range(b)[:, None], b)
  other = tf.not_equal(parent[None, :], parent[:, None])
  score = tf.where(other, offset, b + 1)
  j = tf.argmin(score, axis=1, output_type=tf.int32)
  valid = tf.reduce_any(other, axis=1)
  x = features['patches']
  out = dict(features)
  out['patches'] = tf.concat([x[:, :2], tf.gather(x[:, :1], j)], axis=1)
  labels = dict(labels)
  labels['valid'] = tf.cast(valid, tf.float32)
  labels['negative_node'] = tf.gather(features['nodes'][:, 0], j)
  labels['negative_parent'] = tf.gather(parent, j)
  return out, labels


def masked_mean(values, weights):
  weights = tf.cast(weights, tf.float32)
  return tf.reduce_sum(values * weights) / tf.maximum(tf.reduce_sum(weights),
                                                      1.0)


@base.register
class TransitiveInvarianceTask(base.Task):
  """Triplet ranking on object-graph pairs with in-batch distractors."""

  name = 'ti'
  config_class = TiConfig
  cpu_overrides = {'unit_depths': (128, 64), 'unit_bottleneck': 32,
                   'fc_widths': (256, 128)}
  paper_trunk_inputs = (3, (96, 96))
  head_fields = ('patch_size', 'unit_depths', 'unit_bottleneck', 'fc_widths')

  def make_source(self, spec, tfds_data_dir=None):
    del tfds_data_dir  # graphs do not come from TFDS
    return make_pair_source(spec, self.config)

  def make_dataset(self, source, batch_size, seed, start=0):
    if not isinstance(source, PairSource):
      raise sources.DataSourceError(
          f'ti needs an object-graph source, got {source!r}; make it with '
          f'TransitiveInvarianceTask.make_source.')
    if batch_size < 2:
      raise ValueError(f'ti batch_size must be at least 2, got {batch_size}.')

    def _example(k, anchor, positive, parent, kind, nodes):
      pair = tf.cast(tf.stack([anchor, positive]), tf.float32)
      features = {'index': k, 'patches': preprocessing.vgg_preprocess(pair),
                  'parent': parent, 'nodes': nodes}
      return features, {'edge_type': kind}

    ds = source.pairs(seed, start).map(
        tf.autograph.experimental.do_not_convert(_example),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    counter = source.counter

    def _arrange(features, labels):
      features, labels = arrange_triplets(features, labels)
      missing = tf.reduce_sum(1 - tf.cast(labels['valid'], tf.int32))
      labels['valid'] = counter.note(missing > 0, NO_DISTRACTOR,
                                     labels['valid'])
      return features, labels

    return ds.map(tf.autograph.experimental.do_not_convert(_arrange)).prefetch(
        tf.data.AUTOTUNE)

  def trunk_images(self, features):
    return patches.flatten_groups(features['patches'])

  def build_head(self):
    cfg = self.config
    return TransitiveHead(3, cfg.unit_depths, cfg.unit_bottleneck,
                          cfg.fc_widths, cfg.weight_decay, name='ti_head')

  def initialize_head(self, head, path: str):
    """Copies relative position's patch units from checkpoint `path` into
    the (built) head, as the paper starts every convolutional layer from the
    context-prediction network. Returns what was restored, or None when the
    checkpoint has no rp head; a unit of another shape is a ValueError."""
    shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    prefix = 'heads/rp/units/'
    if not any(k.startswith(prefix) for k in shapes):
      return None
    for i, unit in enumerate(head.units):
      key = f'{prefix}{i}/conv3/conv/kernel/.ATTRIBUTES/VARIABLE_VALUE'
      if shapes.get(key) != unit.conv3.conv.kernel.shape.as_list():
        raise ValueError(
            f'ti unit {i} is {unit.conv3.conv.kernel.shape.as_list()} but '
            f'the rp unit in {path} is {shapes.get(key)}; set '
            f'--ti_unit_depths and --ti_unit_bottleneck to the rp head\'s.')
    holder = tf.Module()
    holder.units = head.units
    tf.train.Checkpoint(heads={'rp': holder}).read(path).expect_partial()
    return 'heads/ti/units from heads/rp/units'

  def loss(self, labels, outputs):
    per_triplet = ex.triplet_loss(outputs, self.config.margin)
    return masked_mean(per_triplet, labels['valid'])

  def build_metrics(self) -> Dict[str, tf_keras.metrics.Metric]:
    names = ('loss', 'triplet_accuracy', 'positive_distance_intra',
             'positive_distance_transitive', 'negative_distance',
             'with_distractor')
    return {n: tf_keras.metrics.Mean(n) for n in names}

  def update_metrics(self, metrics, labels, outputs):
    positive, negative = ex.triplet_distances(outputs)
    valid = tf.cast(labels['valid'], tf.float32)
    kind = labels['edge_type']
    metrics['loss'].update_state(self.loss(labels, outputs))
    metrics['triplet_accuracy'].update_state(
        tf.cast(positive < negative, tf.float32), sample_weight=valid)
    for name, code in (('intra', object_graph.INTRA),
                       ('transitive', object_graph.TRANSITIVE)):
      metrics[f'positive_distance_{name}'].update_state(
          positive, sample_weight=tf.cast(tf.equal(kind, code), tf.float32))
    metrics['negative_distance'].update_state(negative, sample_weight=valid)
    metrics['with_distractor'].update_state(valid)

  def image_summaries(self, features, labels, outputs):
    del labels, outputs
    views = patches.for_display(features['patches'])
    # Anchor, positive and distractor side by side.
    return {'ti/triplets': tf.concat(tf.unstack(views, axis=1), axis=2)}
