"""Analytic MAC counting against hand-computed cases and the paper model's
reference counts."""

import tensorflow as tf
import tf_keras

from mtssl.benchmarking import flops
from mtssl.backbones import resnet_v2 as resnet_lib


class CountMacsTest(tf.test.TestCase):

  def test_hand_computed_layers(self):
    conv = tf_keras.layers.Conv2D(8, 3, strides=2, padding='valid')
    dense = tf_keras.layers.Dense(5)
    conv.build([None, 9, 9, 4])
    dense.build([None, 7])
    # 4x4 output positions x 3x3x4 inputs x 8 outputs, batch 2.
    self.assertEqual(flops.count_macs(conv, tf.TensorSpec([2, 9, 9, 4])),
                     2 * 4 * 4 * 3 * 3 * 4 * 8)
    self.assertEqual(flops.count_macs(dense, tf.TensorSpec([3, 7])), 3 * 7 * 5)
    atrous = tf_keras.layers.Conv2D(8, 3, dilation_rate=2, padding='same')
    atrous.build([None, 9, 9, 4])
    self.assertEqual(flops.count_macs(atrous, tf.TensorSpec([1, 9, 9, 4])),
                     9 * 9 * 3 * 3 * 4 * 8)

  def test_paper_trunk_matches_spec(self):
    # Reference count: 28.75 G MACs per 256x256 image at output stride 8.
    trunk = resnet_lib.paper_trunk(output_stride=8).build_for_input()
    macs = flops.count_macs(lambda x: trunk(x, training=False)[trunk.output_name],
                            tf.TensorSpec([1, 256, 256, 3]))
    self.assertEqual(macs, 28_746_711_040)
    self.assertAllClose(macs / 1e9, 28.75, rtol=1e-3)


if __name__ == '__main__':
  tf.test.main()
