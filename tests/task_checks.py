"""Helpers shared by the task tests: sources, pipeline checks, learning runs.

Iterators live only inside these helpers, so none outlives the call: a tf.data
iterator whose pipeline runs Python (the synthetic source, skip counters) must
not still exist when the interpreter shuts down.
"""

import numpy as np
import tensorflow as tf

from mtssl.data import sources
from mtssl.training import core
from mtssl.training import optimizers
from mtssl.training import step as step_lib


class TensorImageSource(sources.ImageSource):
  """Images made by TF ops from the stream position: make(index) -> uint8."""

  def __init__(self, make, name='tensor'):
    super().__init__(name)
    self.make = make

  def validate(self):
    pass

  def images(self, seed, start=0):
    del seed
    return tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(
        lambda k: (k, self.make(k)), num_parallel_calls=2, deterministic=True)


def take(dataset, n):
  """The first n elements as numpy structures."""
  iterator = iter(dataset)
  try:
    return [tf.nest.map_structure(lambda t: t.numpy(), next(iterator))
            for _ in range(n)]
  finally:
    del iterator


def assert_same_structure_values(test, a, b, exact=True):
  for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
    if exact:
      test.assertAllEqual(x, y)
    else:
      test.assertAllClose(x, y, atol=1e-4)


def eager_and_in_dataset(fn, elements):
  """fn applied to each element eagerly and inside a parallel tf.data map.

  Returns (eager results, dataset results) as lists of numpy structures.
  """
  eager = [tf.nest.map_structure(lambda t: np.asarray(t), fn(*e))
           for e in elements]
  columns = tuple(tf.stack([tf.convert_to_tensor(e[i]) for e in elements])
                  for i in range(len(elements[0])))
  ds = tf.data.Dataset.from_tensor_slices(columns).map(
      fn, num_parallel_calls=2, deterministic=True)
  return eager, take(ds, len(elements))


def learning_run(task, name, source, steps, learning_rate, window, seed=0):
  """Trains task `name` on resnet_v2_tiny with TF1RMSProp.

  Returns (per-step losses, per-window metric results).
  """
  model = core.build_model('resnet_v2_tiny', 8, {name: task}, seed=seed)
  iterator = iter(task.make_dataset(source, task.config.batch_size, seed=seed))
  try:
    features, _ = next(iterator)
    model.build_all({name: features})
    step = step_lib.TaskTrainStep(model, name,
                                  optimizers.TF1RMSProp(learning_rate))
    losses, windows = [], []
    for i in range(steps):
      out = step(*next(iterator))
      losses.append(float(out['loss']))
      if (i + 1) % window == 0:
        windows.append(step.metric_results())
        step.reset_metrics()
    return np.array(losses), windows
  finally:
    del iterator


def bottleneck_params(depth_in, depth, bottleneck, middle_kernel):
  """(trainable, total) parameters of a Slim bottleneck unit."""
  trainable = 2 * depth_in                                     # preact
  moving = 2 * depth_in
  if depth_in != depth:
    trainable += depth_in * depth + depth                      # shortcut
  trainable += depth_in * bottleneck + 2 * bottleneck          # conv1 + BN
  trainable += middle_kernel ** 2 * bottleneck ** 2 + 2 * bottleneck  # conv2
  trainable += bottleneck * depth + depth                      # conv3
  moving += 4 * bottleneck
  return trainable, trainable + moving


def paper_trunk_features(task, patches_per_example):
  """Stand-in block-3 features of the paper's trunk for one example of 96x96
  patches: [patches, 12, 12, 1024] (the size test_resnet_v2 pins)."""
  del task
  return tf.random.normal([patches_per_example, 12, 12, 1024], seed=1)
