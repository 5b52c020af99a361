"""Where evaluations get their trunk: checkpoints of every kind, and misfits."""

import numpy as np
import tensorflow as tf

from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from mtssl.evaluation import trunks
from tests import eval_fixtures


def provider(name='resnet_v2_tiny', checkpoint=None, output_stride=8):
  return trunks.make_trunk_provider(
      trunks.TrunkSpec(name, output_stride, checkpoint, seed=3))


class TrunkProviderTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.trained = provider().build()
    for var in cls.trained.variables:  # something a fresh init is not
      var.assign(var + 0.5)
    cls.object_dir = tf.compat.v1.test.get_temp_dir() + '/object'
    slim_checkpoint.write_trunk_checkpoint(cls.trained, cls.object_dir,
                                           overwrite=True)

  def assert_same_weights(self, trunk):
    want = self.trained.slim_variables()
    for name, var in trunk.slim_variables().items():
      self.assertAllEqual(var, want[name], msg=name)

  def test_random_init_is_seeded(self):
    a, b = provider().build(), provider().build()
    for x, y in zip(a.variables, b.variables):
      self.assertAllEqual(x, y)

  def test_object_checkpoint_directory(self):
    self.assert_same_weights(provider(checkpoint=self.object_dir).build())

  def test_exported_saved_model(self):
    from mtssl.deploy import saved_model  # pylint: disable=g-import-not-at-top
    result = saved_model.export_saved_model(self.trained,
                                            self.get_temp_dir() + '/serving',
                                            image_size=(32, 32))
    self.assert_same_weights(provider(checkpoint=result.path).build())
    with self.assertRaisesRegex(trunks.TrunkLoadError,
                                'holds trunk resnet_v2_tiny, not resnet_v2_small'):
      provider('resnet_v2_small', checkpoint=result.path).build()

  def test_slim_checkpoint_without_conversion(self):
    values = {n: v.numpy() for n, v in self.trained.slim_variables().items()}
    prefix = eval_fixtures.write_name_checkpoint(
        self.get_temp_dir() + '/slim/model.ckpt', values)
    self.assert_same_weights(provider(checkpoint=prefix).build())

  def test_other_architectures_are_named(self):
    with self.assertRaisesRegex(trunks.TrunkLoadError,
                                r'trunk resnet_v2_small has 8; it is another '
                                r'architecture'):
      provider('resnet_v2_small', self.object_dir).build()
    wider = resnet_lib.ResNetV2(
        [resnet_lib.Block('block1', 8, 1, 2), resnet_lib.Block('block2', 16, 1, 2),
         resnet_lib.Block('block3', 64, 3, 2)], output_stride=8,
        scope='resnet_v2_tiny').build_for_input()
    path = self.get_temp_dir() + '/wider'
    slim_checkpoint.write_trunk_checkpoint(wider, path, overwrite=True)
    with self.assertRaisesRegex(trunks.TrunkLoadError,
                                r'does not match trunk resnet_v2_tiny: .*'
                                r'incompatible tensor with shape'):
      provider(checkpoint=path).build()

  def test_more_units_of_the_same_widths_are_named(self):
    deeper = resnet_lib.ResNetV2(
        [resnet_lib.Block('block1', 8, 1, 2), resnet_lib.Block('block2', 16, 1, 2),
         resnet_lib.Block('block3', 32, 4, 2)], output_stride=8,
        scope='resnet_v2_tiny').build_for_input()
    path = self.get_temp_dir() + '/deeper'
    slim_checkpoint.write_trunk_checkpoint(deeper, path, overwrite=True)
    with self.assertRaisesRegex(
        trunks.TrunkLoadError,
        r'holds a trunk of 6 bottleneck units, but trunk resnet_v2_tiny has 5'):
      provider(checkpoint=path).build()

  def test_missing_or_foreign_checkpoints(self):
    with self.assertRaisesRegex(trunks.TrunkLoadError, 'does not exist'):
      trunks.validate_trunk_spec(trunks.TrunkSpec(
          'resnet_v2_tiny', 8, self.get_temp_dir() + '/nothing'))
    prefix = eval_fixtures.write_name_checkpoint(
        self.get_temp_dir() + '/other/model.ckpt',
        {'vgg_16/conv1/weights': np.zeros([3, 3, 3, 4], np.float32)})
    with self.assertRaisesRegex(trunks.TrunkLoadError,
                                r'neither a `backbone` trunk .* nor TF-Slim'):
      provider(checkpoint=prefix).build()
    with self.assertRaisesRegex(trunks.TrunkLoadError,
                                'target output_stride 12 cannot'):
      trunks.validate_trunk_spec(trunks.TrunkSpec('resnet_v2_tiny', 12))


if __name__ == '__main__':
  tf.test.main()
