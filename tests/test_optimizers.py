"""TF1RMSProp reproduces tf.compat.v1.train.RMSPropOptimizer exactly."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mtssl.training import optimizers


def tf1_trajectory(initial, grads, lr, decay, momentum, epsilon):
  graph = tf.Graph()
  with graph.as_default():
    var = tf.compat.v1.get_variable('v', initializer=initial, use_resource=True)
    grad = tf.compat.v1.placeholder(tf.float32, initial.shape)
    opt = tf.compat.v1.train.RMSPropOptimizer(lr, decay=decay, momentum=momentum,
                                              epsilon=epsilon)
    train = opt.apply_gradients([(grad, var)])
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      out = []
      for g in grads:
        sess.run(train, {grad: g})
        out.append(sess.run(var))
  return out


class TF1RMSPropTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((0.0,), (0.9,))
  def test_matches_tf1_optimizer(self, momentum):
    rng = np.random.default_rng(0)
    initial = rng.normal(size=[5, 3]).astype(np.float32)
    grads = [rng.normal(size=[5, 3]).astype(np.float32) * 10 ** -k
             for k in range(6)]
    expected = tf1_trajectory(initial, grads, 0.01, 0.9, momentum, 1e-10)
    var = tf.Variable(initial)
    opt = optimizers.TF1RMSProp(0.01, momentum=momentum)
    for g, want in zip(grads, expected):
      opt.apply_gradients([(tf.constant(g), var)])
      self.assertAllClose(var.numpy(), want, rtol=1e-6, atol=1e-7)

  def test_first_step_uses_ones_for_the_mean_square(self):
    var = tf.Variable([1.0])
    opt = optimizers.TF1RMSProp(0.1)
    opt.apply_gradients([(tf.constant([2.0]), var)])
    # ms = 0.9 * 1 + 0.1 * 4 = 1.3; step = 0.1 * 2 / sqrt(1.3).
    self.assertAllClose(var.numpy(), [1.0 - 0.2 / np.sqrt(1.3)], rtol=1e-6)
    self.assertAllClose(opt.get_slot(var, 'rms').numpy(), [1.3])

  def test_config_round_trip(self):
    opt = optimizers.TF1RMSProp(0.5, decay=0.8, momentum=0.3, epsilon=1e-8)
    clone = optimizers.TF1RMSProp.from_config(opt.get_config())
    self.assertEqual(clone.get_config(), opt.get_config())


if __name__ == '__main__':
  tf.test.main()
