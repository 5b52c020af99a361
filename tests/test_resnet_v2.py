"""Structure, atrous bookkeeping and training behaviour of the Keras trunk.

The real ResNet-v2-101 is built only where its size is the point (variable
and kernel counts, feature-map sizes); everything else uses tiny nets.
"""

import numpy as np
import tensorflow as tf
import tf_keras
from absl.testing import parameterized

from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_layers

TINY_BLOCKS = [
    resnet_lib.Block('block1', 4, 2, 2),
    resnet_lib.Block('block2', 8, 2, 2),
    resnet_lib.Block('block3', 8, 3, 2),
    resnet_lib.Block('block4', 16, 2, 1),
]


def tiny(output_stride=None, blocks=TINY_BLOCKS, **kwargs):
  return resnet_lib.ResNetV2(blocks, output_stride=output_stride,
                             scope='tiny', **kwargs)


class PlanTest(parameterized.TestCase):

  def test_paper_trunk_rates_at_output_stride_8(self):
    plan = resnet_lib.plan_units(resnet_lib.resnet_v2_blocks(101, 3), 8)
    by_block = {}
    for u in plan:
      by_block.setdefault(u.block, []).append((u.stride, u.rate))
    # block1's last unit brings the stride from 4 to 8.
    self.assertEqual(by_block['block1'], [(1, 1), (1, 1), (2, 1)])
    # block2 runs at rate 1; its last unit's stride becomes rate 2 later.
    self.assertEqual(by_block['block2'], [(1, 1)] * 4)
    self.assertEqual(by_block['block3'], [(1, 2)] * 23)

  def test_output_stride_16_and_nominal(self):
    plan = resnet_lib.plan_units(resnet_lib.resnet_v2_blocks(101), 16)
    block3 = [(u.stride, u.rate) for u in plan if u.block == 'block3']
    self.assertEqual(block3, [(1, 1)] * 23)
    block4 = [(u.stride, u.rate) for u in plan if u.block == 'block4']
    self.assertEqual(block4, [(1, 2)] * 3)
    nominal = resnet_lib.plan_units(resnet_lib.resnet_v2_blocks(101), None)
    self.assertEqual([u.stride for u in nominal if u.stride > 1], [2, 2, 2])
    self.assertTrue(all(u.rate == 1 for u in nominal))

  @parameterized.parameters(6, 0, -8, 64)
  def test_unreachable_output_stride_is_rejected(self, output_stride):
    with self.assertRaisesRegex(ValueError, 'output_stride'):
      resnet_lib.plan_units(resnet_lib.resnet_v2_blocks(101), output_stride)

  def test_unknown_depth_and_block_count(self):
    with self.assertRaisesRegex(ValueError, 'depth 34'):
      resnet_lib.resnet_v2_blocks(34)
    with self.assertRaisesRegex(ValueError, 'num_blocks'):
      resnet_lib.resnet_v2_blocks(101, 5)


class ResNetV2101SizeTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.trunk = resnet_lib.paper_trunk(output_stride=8).build_for_input()

  def test_variable_and_kernel_counts_match_slim(self):
    # tf_slim 1.1.0 resnet_v2_101 to block 3: 27,635,200 variables including
    # batch-norm moving statistics (27.6 M for ResNet-v2-101 to block 3), 94 conv kernels.
    self.assertEqual(sum(int(np.prod(v.shape)) for v in self.trunk.variables),
                     27_635_200)
    kernels = [n for n in self.trunk.slim_variables() if n.endswith('/weights')]
    self.assertLen(kernels, 94)
    self.assertLen(self.trunk.losses, 94)

  def test_feature_map_sizes_at_output_stride_8(self):
    for (h, w), (fh, fw) in (((96, 96), (12, 12)), ((256, 256), (32, 32)),
                             ((240, 320), (30, 40))):
      out = self.trunk(tf.zeros([1, h, w, 3]), training=False)
      self.assertEqual(out[self.trunk.output_name].shape, (1, fh, fw, 1024))

  def test_end_point_names(self):
    units = self.trunk.unit_names('block3')
    self.assertLen(units, 23)
    self.assertEqual(units[4], 'resnet_v2_101/block3/unit_5/bottleneck_v2')
    self.assertEqual(self.trunk.output_name, 'resnet_v2_101/block3')
    self.assertEqual(self.trunk.block_names,
                     ['resnet_v2_101/block1', 'resnet_v2_101/block2',
                      'resnet_v2_101/block3'])
    names = self.trunk.slim_variables()
    self.assertIn('resnet_v2_101/conv1/biases', names)
    self.assertIn(
        'resnet_v2_101/block3/unit_5/bottleneck_v2/preact/moving_variance',
        names)
    self.assertIn('resnet_v2_101/block1/unit_1/bottleneck_v2/shortcut/biases',
                  names)
    self.assertNotIn('resnet_v2_101/block1/unit_2/bottleneck_v2/shortcut/weights',
                     names)


class TinyTrunkTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(4, 8, 16)
  def test_atrous_output_equals_subsampled_dense_output(self, output_stride):
    # Slim's atrous property: with inputs of size 32k+1 the dense output at
    # stride s, subsampled by nominal/s, equals the nominal-stride output.
    images = tf.random.stateless_normal([2, 65, 65, 3], seed=[1, 2])
    nominal = tiny(None)
    dense = tiny(output_stride)
    nominal.build_for_input()
    dense.build_for_input()
    for src, dst in zip(nominal.variables, dense.variables):
      dst.assign(src)
    expected = nominal(images, training=False)[nominal.output_name]
    out = dense(images, training=False)[dense.output_name]
    factor = nominal.effective_output_stride // output_stride
    self.assertEqual(nominal.effective_output_stride, 32)
    self.assertAllClose(out[:, ::factor, ::factor, :], expected, rtol=1e-4,
                        atol=1e-4)

  def test_conv2d_same_pads_symmetrically(self):
    # A 3x3 stride-2 conv on an even input: Slim pads (1, 1), Keras 'same'
    # would pad (0, 1). With an all-ones kernel the top-left output sums the
    # 2x2 corner of the input plus padding.
    layer = slim_layers.SlimConv2D(1, 3, stride=2, batch_norm=False,
                                   activation=False)
    x = tf.reshape(tf.range(16, dtype=tf.float32), [1, 4, 4, 1])
    layer(x)
    layer.conv.kernel.assign(tf.ones_like(layer.conv.kernel))
    out = layer(x)
    self.assertEqual(out.shape, (1, 2, 2, 1))
    self.assertAllClose(out[0, 0, 0, 0], 0 + 1 + 4 + 5)
    keras_same = tf.nn.conv2d(x, tf.ones([3, 3, 1, 1]), 2, 'SAME')
    self.assertNotAllClose(out, keras_same)

  def test_end_points_for_lasso(self):
    trunk = tiny(8)
    out = trunk(tf.zeros([1, 33, 33, 3]))
    units = trunk.unit_names('block3')
    self.assertLen(units, 3)
    for name in units + trunk.block_names + ['tiny/conv1']:
      self.assertIn(name, out)
    self.assertAllEqual(out['tiny/block3'], out[units[-1]])

  def test_postnorm_only_when_asked(self):
    without = tiny(blocks=TINY_BLOCKS[:3])
    with_norm = tiny(blocks=TINY_BLOCKS[:3], include_postnorm=True)
    self.assertEqual(without(tf.zeros([1, 33, 33, 3])).keys() - {'tiny/postnorm'},
                     without(tf.zeros([1, 33, 33, 3])).keys())
    self.assertEqual(with_norm.output_name, 'tiny/postnorm')
    self.assertIn('tiny/postnorm/gamma', with_norm.build_for_input().slim_variables())

  def test_config_round_trip(self):
    trunk = tiny(8, include_postnorm=True)
    clone = resnet_lib.ResNetV2.from_config(trunk.get_config())
    self.assertEqual(clone.get_config(), trunk.get_config())
    self.assertEqual(clone.unit_plan, trunk.unit_plan)

  def test_initializer_matches_slim_statistics(self):
    init = slim_layers.SlimVarianceScaling(seed=3)
    w = init([3, 3, 64, 256]).numpy()
    # Normal truncated at 2 sigma with sigma = sqrt(1.3 * 2 / fan_in): the
    # truncated normal's std is 0.8796 sigma.
    sigma = np.sqrt(1.3 * 2 / (3 * 3 * 64))
    self.assertAllClose(w.std(), 0.8796 * sigma, rtol=0.02)
    self.assertLessEqual(np.abs(w).max(), 2 * sigma + 1e-6)

  def test_weight_decay_is_slim_l2(self):
    trunk = tiny(blocks=TINY_BLOCKS[:1]).build_for_input()
    kernels = [v for n, v in trunk.slim_variables().items()
               if n.endswith('/weights')]
    expected = 1e-4 * sum(float(tf.nn.l2_loss(k)) for k in kernels)
    self.assertAllClose(float(tf.add_n(trunk.losses)), expected, rtol=1e-5)

  def test_trains_under_mixed_precision(self):
    tf_keras.mixed_precision.set_global_policy('mixed_bfloat16')
    try:
      trunk = tiny(8)
      images = tf.random.stateless_uniform([2, 33, 33, 3], seed=[0, 1])
      out = trunk(images, training=True)[trunk.output_name]
      self.assertEqual(out.dtype, tf.bfloat16)
      self.assertTrue(all(v.dtype == tf.float32 for v in trunk.variables))
    finally:
      tf_keras.mixed_precision.set_global_policy('float32')

  def test_xla_matches_eager(self):
    trunk = tiny(8)
    images = tf.random.stateless_uniform([2, 33, 33, 3], seed=[0, 2])
    eager = trunk(images, training=False)[trunk.output_name]
    xla = tf.function(lambda x: trunk(x, training=False)[trunk.output_name],
                      jit_compile=True)(images)
    self.assertAllClose(xla, eager, rtol=1e-4, atol=1e-4)

  def test_trains_under_a_distribution_strategy(self):
    # conftest.py splits the CPU into two logical devices: two replicas.
    strategy = tf.distribute.MirroredStrategy(
        ['/cpu:0', '/cpu:1'],
        cross_device_ops=tf.distribute.ReductionToOneDevice('/cpu:0'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      trunk = tiny(8).build_for_input()
      optimizer = tf_keras.optimizers.SGD(0.1)
    images = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(
            tf.random.stateless_uniform([4, 33, 33, 3], seed=[0, 3]))
    ).__iter__().next()

    @tf.function
    def step(x):
      def replica_step(x):
        with tf.GradientTape() as tape:
          loss = tf.reduce_mean(trunk(x, training=True)[trunk.output_name] ** 2)
          loss += tf.add_n(trunk.losses)
        grads = tape.gradient(loss, trunk.trainable_variables)
        optimizer.apply_gradients(zip(grads, trunk.trainable_variables))
        return loss
      return strategy.run(replica_step, args=(x,))

    before = trunk.conv1.conv.kernel.numpy()
    loss = strategy.reduce('SUM', step(images), axis=None)
    self.assertTrue(np.isfinite(float(loss)))
    self.assertNotAllClose(trunk.conv1.conv.kernel.numpy(), before)


if __name__ == '__main__':
  tf.test.main()
