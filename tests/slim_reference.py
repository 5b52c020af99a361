"""Helpers that build the TF-Slim reference networks and write Slim checkpoints.

Slim is built in TF1 graph mode inside its own `tf.Graph`, so nothing here
touches the eager context the Keras code runs in.
"""

import numpy as np
import tensorflow as tf

from mtssl.utils.compat import import_tf_slim

slim = import_tf_slim()
from tf_slim.nets import resnet_utils as slim_resnet_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_slim.nets import resnet_v2 as slim_resnet_v2  # pylint: disable=g-import-not-at-top,wrong-import-position


def slim_blocks(blocks):
  """mtssl Block list -> tf_slim Block list."""
  return [slim_resnet_v2.resnet_v2_block(b.scope, base_depth=b.base_depth,
                                         num_units=b.num_units, stride=b.stride)
          for b in blocks]


def randomize_batch_norm(sess, seed=0):
  """Gives every BN gamma/beta/moving statistic and bias a random value."""
  rng = np.random.default_rng(seed)
  assigns = []
  for var in tf.compat.v1.global_variables():
    name = var.op.name
    shape = var.shape.as_list()
    if name.endswith('/gamma'):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith('/beta') or name.endswith('/moving_mean'):
      value = rng.normal(0.0, 0.2, shape)
    elif name.endswith('/moving_variance'):
      value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith('/biases'):
      value = rng.normal(0.0, 0.1, shape)
    else:
      continue
    assigns.append(var.assign(value.astype(np.float32)))
  sess.run(assigns)


class SlimResNet:
  """tf_slim resnet_v2 in one graph, one tower per output stride.

  The first tower creates the variables; the others reuse them, so one
  checkpoint serves every configuration. Batch-norm mode is a boolean tensor
  fed at run time (Slim's batch_norm accepts one).
  """

  def __init__(self, blocks, scope, output_strides, num_classes=None, seed=0,
               weight_decay=1e-4):
    self.graph = tf.Graph()
    self.towers = {}
    configs = list(output_strides)
    # Graph-mode equality is identity either way; with equality off, the
    # membership tests over the variable collections that the legacy layers
    # make for every variable skip a context-stack walk per comparison
    # (ResNet-101 in three towers, 2-core machine: 26.8 -> 18.3 CPU-s).
    tf.compat.v1.disable_tensor_equality()
    try:
      self._build(blocks, scope, configs, num_classes, seed, weight_decay)
    finally:
      tf.compat.v1.enable_tensor_equality()
    self.sess = tf.compat.v1.Session(graph=self.graph)
    with self.graph.as_default():
      self.sess.run(tf.compat.v1.global_variables_initializer())
      randomize_batch_norm(self.sess, seed)

  def _build(self, blocks, scope, configs, num_classes, seed, weight_decay):
    with self.graph.as_default():
      tf.compat.v1.set_random_seed(seed)
      self.images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
      self.is_training = tf.compat.v1.placeholder_with_default(False, [])
      for i, output_stride in enumerate(configs):
        with slim.arg_scope(slim_resnet_v2.resnet_arg_scope(
            weight_decay=weight_decay)):
          net, end_points = slim_resnet_v2.resnet_v2(
              self.images, slim_blocks(blocks), num_classes=num_classes,
              is_training=self.is_training, global_pool=False,
              output_stride=output_stride, reuse=i > 0, scope=scope)
        end_points = dict(end_points)
        if num_classes is None:
          end_points[f'{scope}/postnorm'] = net
        self.towers[output_stride] = end_points
      # Regularizers are attached once, when the first tower creates the
      # variables.
      self.reg_loss = tf.add_n(tf.compat.v1.get_collection(
          tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES))
      self.update_ops = {
          key: [op for op in tf.compat.v1.get_collection(
              tf.compat.v1.GraphKeys.UPDATE_OPS)
                if op.name.startswith(f'{scope}_{i}/' if i else f'{scope}/')]
          for i, key in enumerate(configs)
      }
      self.saver = tf.compat.v1.train.Saver()

  def run(self, output_stride, training, images, names=None):
    end_points = self.towers[output_stride]
    names = list(end_points) if names is None else names
    values = self.sess.run([end_points[n] for n in names],
                           {self.images: images, self.is_training: training})
    return dict(zip(names, values))

  def save(self, path):
    with self.graph.as_default():
      return self.saver.save(self.sess, path, write_meta_graph=False)

  def restore(self, path):
    with self.graph.as_default():
      self.saver.restore(self.sess, path)

  def variable_values(self, suffix=None):
    with self.graph.as_default():
      variables = tf.compat.v1.global_variables()
    values = self.sess.run({v.op.name: v for v in variables
                            if suffix is None or v.op.name.endswith(suffix)})
    return values

  def run_update(self, output_stride, images):
    self.sess.run(self.update_ops[output_stride],
                  {self.images: images, self.is_training: True})

  def close(self):
    self.sess.close()


def write_name_checkpoint(values, path):
  """Writes {name: array} as a name-based (Slim-style) TF1 checkpoint."""
  graph = tf.Graph()
  with graph.as_default():
    variables = {name: tf.compat.v1.Variable(value, name=name.replace(':', '_'))
                 for name, value in values.items()}
    saver = tf.compat.v1.train.Saver(var_list=variables)
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      return saver.save(sess, path, write_meta_graph=False)


def read_checkpoint_values(path):
  reader = tf.train.load_checkpoint(path)
  return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}


def relative_error(actual, expected):
  """max |actual - expected| / RMS(expected): the error at activation scale."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = np.sqrt(np.mean(expected ** 2)) + 1e-12
  return float(np.max(np.abs(actual - expected)) / scale)


__all__ = ['SlimResNet', 'slim_resnet_utils', 'slim_resnet_v2',
           'write_name_checkpoint', 'read_checkpoint_values', 'relative_error']
