"""Numerical parity of the Keras trunk with tf_slim's resnet_v2_101.

The reference is `tf_slim.nets.resnet_v2` built in graph mode with random
weights (batch-norm statistics randomized too), saved as a Slim checkpoint and
loaded into the Keras trunk through the converter. Every end point (root,
every unit, every block, postnorm) must agree to 1e-4 of the activation's RMS,
for output strides None, 8 and 16, odd and even input sizes, in inference and
in training mode.
"""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from tests import slim_reference

OUTPUT_STRIDES = (None, 8, 16)
SIZES = ((97, 131), (96, 96))
TOLERANCE = 1e-4


class ResNetV2101ParityTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.blocks = resnet_lib.resnet_v2_blocks(101)
    cls.slim = slim_reference.SlimResNet(cls.blocks, 'resnet_v2_101',
                                         OUTPUT_STRIDES)
    cls.ckpt_dir = cls._tmp = tf.compat.v1.test.get_temp_dir()
    cls.ckpt = cls.slim.save(f'{cls.ckpt_dir}/slim_resnet_v2_101')
    cls.trunks = {}
    for os_ in OUTPUT_STRIDES:
      trunk = resnet_lib.resnet_v2_101(output_stride=os_)
      slim_checkpoint.load_slim_checkpoint(trunk, cls.ckpt)
      cls.trunks[os_] = trunk
    rng = np.random.default_rng(1)
    cls.images = {s: rng.normal(0.0, 60.0, (2, *s, 3)).astype(np.float32)
                  for s in SIZES}

  @classmethod
  def tearDownClass(cls):
    cls.slim.close()
    super().tearDownClass()

  def _compare(self, keras_out, slim_out):
    compared = 0
    for name, value in keras_out.items():
      self.assertIn(name, slim_out, f'Slim has no end point {name}')
      self.assertEqual(tuple(value.shape), slim_out[name].shape, name)
      err = slim_reference.relative_error(value, slim_out[name])
      self.assertLess(err, TOLERANCE, f'{name}: relative error {err:.2e}')
      compared += 1
    return compared

  @parameterized.product(output_stride=OUTPUT_STRIDES, training=(False, True))
  def test_every_end_point_matches_slim(self, output_stride, training):
    trunk = self.trunks[output_stride]
    for size in SIZES:
      images = self.images[size]
      slim_out = self.slim.run(output_stride, training, images)
      # Training-mode calls update the moving statistics of the Keras trunk;
      # run them on a throw-away copy of the variables.
      if training:
        saved = [v.numpy() for v in trunk.variables]
      keras_out = {k: v.numpy() for k, v in trunk(images, training=training).items()}
      if training:
        for var, value in zip(trunk.variables, saved):
          var.assign(value)
      compared = self._compare(keras_out, slim_out)
      # conv1, 33 units, 4 blocks and postnorm.
      self.assertEqual(compared, 1 + 33 + 4 + 1)

  def test_block3_trunk_matches_slim_and_reports_unused(self):
    trunk = resnet_lib.paper_trunk(output_stride=8)
    report = slim_checkpoint.load_slim_checkpoint(trunk, self.ckpt)
    self.assertTrue(all(n.startswith(('resnet_v2_101/block4/',
                                      'resnet_v2_101/postnorm/'))
                        for n in report.unused), report.unused[:5])
    self.assertLen([n for n in report.unused if n.endswith('/weights')], 10)
    images = self.images[(97, 131)]
    slim_out = self.slim.run(8, False, images, ['resnet_v2_101/block3'])
    out = trunk(images, training=False)
    self.assertEqual(list(out)[-1], 'resnet_v2_101/block3')
    self.assertEqual(out['resnet_v2_101/block3'].shape, (2, 13, 17, 1024))
    self.assertLess(slim_reference.relative_error(
        out['resnet_v2_101/block3'], slim_out['resnet_v2_101/block3']), TOLERANCE)

  def test_weight_decay_matches_slim(self):
    slim_reg = self.slim.sess.run(self.slim.reg_loss)
    keras_reg = float(tf.add_n(self.trunks[8].losses))
    self.assertAllClose(keras_reg, slim_reg, rtol=1e-5)
    self.assertLen(self.trunks[8].losses, 104)

  def test_moving_statistics_update_matches_slim(self):
    images = self.images[(96, 96)]
    trunk = resnet_lib.resnet_v2_101(output_stride=16)
    slim_checkpoint.load_slim_checkpoint(trunk, self.ckpt)
    before = self.slim.variable_values('/moving_variance')
    self.slim.run_update(16, images)
    after_slim = self.slim.variable_values()
    self.slim.restore(self.ckpt)
    trunk(images, training=True)
    keras_vars = trunk.slim_variables()
    changed = 0
    for name, var in keras_vars.items():
      if 'moving_' not in name:
        continue
      self.assertAllClose(var.numpy(), after_slim[name], rtol=1e-4, atol=1e-5,
                          msg=name)
      if name in before:
        changed += int(np.any(before[name] != after_slim[name]))
    # 100 batch norms: 33 units x (preact, conv1, conv2) + postnorm; one
    # training step moves every moving variance.
    self.assertEqual(changed, 100)


if __name__ == '__main__':
  tf.test.main()
