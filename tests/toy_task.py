"""A minimal task for testing the training machinery (not a real task).

It predicts the mean colour of a synthetic image from the trunk's features;
a NaN can be injected into chosen batches to exercise non-finite handling.
"""

import dataclasses

import tensorflow as tf
import tf_keras

from mtssl.ops import preprocessing
from mtssl.tasks import base


@dataclasses.dataclass
class ToyConfig(base.TaskConfig):
  image_size: int = 33
  nan_at_positions: tuple = ()


class ToyHead(tf_keras.Model):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = tf_keras.layers.Dense(3, name='logits', dtype='float32')

  def call(self, features, training=None):
    return self.dense(tf.reduce_mean(features, axis=[1, 2]))


class ToyTask(base.Task):
  name = 'toy'
  config_class = ToyConfig

  def make_dataset(self, source, batch_size, seed, start=0):
    size = self.config.image_size
    nan_at = tf.constant(list(self.config.nan_at_positions) or [-1], tf.int64)

    def _example(k, image):
      image = tf.image.resize(tf.cast(image, tf.float32), [size, size])
      image = tf.where(tf.reduce_any(tf.equal(nan_at, k)), image * float('nan'),
                       image)
      target = tf.reduce_mean(image, axis=[0, 1]) / 255.0
      return {'index': k, 'image': preprocessing.vgg_preprocess(image)}, {
          'target': target}

    return source.images(seed, start).map(_example).batch(batch_size,
                                                         drop_remainder=True)

  def trunk_images(self, features):
    return features['image']

  def build_head(self):
    return ToyHead(name=f'{self.name}_head')

  def loss(self, labels, outputs):
    return tf.reduce_mean(tf.square(outputs - labels['target']))

  def build_metrics(self):
    return {'mse': tf_keras.metrics.Mean('mse')}

  def update_metrics(self, metrics, labels, outputs):
    metrics['mse'].update_state(tf.square(outputs - labels['target']))


def toy_task_class(name):
  """A ToyTask subclass called `name` (register it with
  `base.temporary_tasks` where a registry lookup needs it)."""
  return type(f'ToyTask_{name}', (ToyTask,), {'name': name})
