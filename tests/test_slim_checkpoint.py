"""Slim checkpoint conversion: round trip, and clear errors that write nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from tests import slim_reference
from tests import tool_runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    resnet_lib.Block('block1', 4, 2, 2),
    resnet_lib.Block('block2', 8, 3, 2),
    resnet_lib.Block('block3', 8, 2, 1),
]


class TinyConversionTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.slim = slim_reference.SlimResNet(TINY, 'resnet_v2_tiny', [8])
    cls.dir = tf.compat.v1.test.get_temp_dir()
    cls.ckpt = cls.slim.save(os.path.join(cls.dir, 'tiny_slim'))
    cls.images = np.random.default_rng(0).normal(0, 50, (2, 41, 37, 3)).astype(
        np.float32)

  @classmethod
  def tearDownClass(cls):
    cls.slim.close()
    super().tearDownClass()

  def trunk(self, blocks=TINY):
    return resnet_lib.ResNetV2(blocks, output_stride=8, include_postnorm=True,
                               scope='resnet_v2_tiny')

  def test_round_trip_through_converted_checkpoint(self):
    trunk = self.trunk()
    report = slim_checkpoint.load_slim_checkpoint(trunk, self.ckpt)
    self.assertEqual(report.unused, [])
    out_dir = os.path.join(self.get_temp_dir(), 'converted')
    prefix = slim_checkpoint.write_trunk_checkpoint(trunk, out_dir, report=report)
    self.assertEqual(tf.train.latest_checkpoint(out_dir), prefix)
    restored = self.trunk()
    slim_checkpoint.restore_trunk(restored, out_dir)
    expected = self.slim.run(8, False, self.images)
    out = restored(self.images, training=False)
    for name, value in out.items():
      self.assertAllClose(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    with open(os.path.join(out_dir, 'conversion_report.json')) as f:
      self.assertEqual(json.load(f)['num_loaded'], len(trunk.slim_variables()))

  def test_missing_variable_is_named_and_nothing_assigned(self):
    values = slim_reference.read_checkpoint_values(self.ckpt)
    gone = 'resnet_v2_tiny/block2/unit_3/bottleneck_v2/conv2/BatchNorm/gamma'
    del values[gone]
    path = slim_reference.write_name_checkpoint(
        values, os.path.join(self.get_temp_dir(), 'missing'))
    trunk = self.trunk().build_for_input()
    before = [v.numpy() for v in trunk.variables]
    with self.assertRaisesRegex(slim_checkpoint.SlimCheckpointError, gone):
      slim_checkpoint.load_slim_checkpoint(trunk, path)
    for var, value in zip(trunk.variables, before):
      self.assertAllEqual(var.numpy(), value)

  def test_shape_mismatch_names_variable_and_shapes(self):
    values = slim_reference.read_checkpoint_values(self.ckpt)
    name = 'resnet_v2_tiny/block1/unit_1/bottleneck_v2/conv3/weights'
    values[name] = np.zeros([1, 1, 4, 15], np.float32)
    path = slim_reference.write_name_checkpoint(
        values, os.path.join(self.get_temp_dir(), 'shape'))
    with self.assertRaisesRegex(
        slim_checkpoint.SlimCheckpointError,
        rf'{name}: checkpoint \(1, 1, 4, 15\), trunk \(1, 1, 4, 16\)'):
      slim_checkpoint.load_slim_checkpoint(self.trunk(), path)

  def test_other_depth_says_so(self):
    deeper = [TINY[0], resnet_lib.Block('block2', 8, 5, 2), TINY[2]]
    with self.assertRaisesRegex(slim_checkpoint.SlimCheckpointError,
                                'block2: checkpoint 3 units, trunk 5'):
      slim_checkpoint.load_slim_checkpoint(self.trunk(deeper), self.ckpt)

  def test_checkpoint_cut_before_the_trunk_ends(self):
    values = {n: v for n, v in slim_reference.read_checkpoint_values(
        self.ckpt).items() if '/block3/' not in n and '/postnorm/' not in n}
    path = slim_reference.write_name_checkpoint(
        values, os.path.join(self.get_temp_dir(), 'two_blocks'))
    with self.assertRaisesRegex(slim_checkpoint.SlimCheckpointError,
                                'no variables of block3.*num_blocks=2'):
      slim_checkpoint.load_slim_checkpoint(self.trunk(), path)
    # The same checkpoint loads into a trunk cut after block 2, and the extra
    # Slim variables (here a logits layer) are listed as unused.
    values['resnet_v2_tiny/logits/weights'] = np.zeros([1, 1, 32, 5], np.float32)
    path = slim_reference.write_name_checkpoint(
        values, os.path.join(self.get_temp_dir(), 'two_blocks_logits'))
    report = slim_checkpoint.load_slim_checkpoint(
        resnet_lib.ResNetV2(TINY[:2], output_stride=8, scope='resnet_v2_tiny'),
        path)
    self.assertEqual(report.unused, ['resnet_v2_tiny/logits/weights'])

  def test_unreadable_checkpoint(self):
    with self.assertRaisesRegex(slim_checkpoint.SlimCheckpointError,
                                'Cannot read checkpoint'):
      slim_checkpoint.load_slim_checkpoint(
          self.trunk(), os.path.join(self.get_temp_dir(), 'nothing_here'))

  def test_truncated_checkpoint_is_named_not_a_traceback(self):
    copy = os.path.join(self.get_temp_dir(), 'truncated')
    for path in tf.io.gfile.glob(self.ckpt + '.*'):
      tf.io.gfile.copy(path, copy + path[len(self.ckpt):], overwrite=True)
    data = tf.io.gfile.glob(copy + '.data-*')[0]
    with open(data, 'r+b') as f:
      f.truncate(os.path.getsize(data) // 2)
    with self.assertRaisesRegex(slim_checkpoint.SlimCheckpointError,
                                f'Checkpoint {copy!r}: variable .* cannot be '
                                'read'):
      slim_checkpoint.load_slim_checkpoint(self.trunk(), copy)

  def test_restore_rejects_a_trunk_of_another_architecture(self):
    trunk = self.trunk()
    slim_checkpoint.load_slim_checkpoint(trunk, self.ckpt)
    out_dir = os.path.join(self.get_temp_dir(), 'arch')
    slim_checkpoint.write_trunk_checkpoint(trunk, out_dir)
    other = resnet_lib.ResNetV2(
        [TINY[0], resnet_lib.Block('block2', 16, 3, 2), TINY[2]],
        output_stride=8, scope='resnet_v2_tiny')
    with self.assertRaisesRegex(slim_checkpoint.SlimCheckpointError,
                                'does not match trunk'):
      slim_checkpoint.restore_trunk(other, out_dir)


class ConverterCommandLineTest(tf.test.TestCase):
  """The tools/ command on a full-size resnet_v2_50 Slim-named checkpoint.

  (resnet_v2_101 parity through the same loader is in
  test_resnet_v2_parity.py; depth 50 keeps this test's checkpoint small.)
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tf.compat.v1.test.get_temp_dir()
    values = {}
    trunk = resnet_lib.resnet_v2_50(num_blocks=4).build_for_input()
    for name, var in trunk.slim_variables().items():
      values[name] = var.numpy()
    values['resnet_v2_50/logits/weights'] = np.zeros([1, 1, 2048, 3], np.float32)
    values['global_step'] = np.int64(7)
    cls.full = slim_reference.write_name_checkpoint(
        values, os.path.join(cls.dir, 'full', 'model.ckpt'))
    cls.trunk_values = values
    del values['resnet_v2_50/block3/unit_4/bottleneck_v2/conv1/weights']
    cls.broken = slim_reference.write_name_checkpoint(
        values, os.path.join(cls.dir, 'broken', 'model.ckpt'))

  def run_tool(self, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'convert_slim_checkpoint.py'),
         *args], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))

  def test_converts_to_block3_and_lists_unused(self):
    out_dir = os.path.join(self.get_temp_dir(), 'converted')
    result = self.run_tool(f'--slim_checkpoint={self.full}',
                           f'--output_dir={out_dir}', '--num_blocks=3',
                           '--depth=50')
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn('backbone-1', result.stdout)
    with open(os.path.join(out_dir, 'conversion_report.json')) as f:
      report = json.load(f)
    # block4, postnorm, logits and global_step. A unit has 16 variables
    # (preact 4, conv1 5, conv2 5, conv3 2); block4's first unit adds a
    # shortcut (2).
    self.assertIn('resnet_v2_50/logits/weights', report['unused'])
    self.assertIn('global_step', report['unused'])
    self.assertEqual(report['unused_summary']['resnet_v2_50/block4'], 3 * 16 + 2)
    trunk = resnet_lib.resnet_v2_50(num_blocks=3)
    slim_checkpoint.restore_trunk(trunk, out_dir)
    name = 'resnet_v2_50/block3/unit_6/bottleneck_v2/conv3/weights'
    self.assertAllEqual(trunk.slim_variables()[name], self.trunk_values[name])
    # An existing output is not overwritten unless asked.
    status, _, stderr = tool_runner.run_tool(
        'convert_slim_checkpoint.py', f'--slim_checkpoint={self.full}',
        f'--output_dir={out_dir}', '--depth=50')
    self.assertEqual(status, 2)
    self.assertIn('already exists', stderr)

  def test_missing_variable_fails_and_writes_nothing(self):
    out_dir = os.path.join(self.get_temp_dir(), 'never')
    status, _, stderr = tool_runner.run_tool(
        'convert_slim_checkpoint.py', f'--slim_checkpoint={self.broken}',
        f'--output_dir={out_dir}', '--depth=50')
    self.assertEqual(status, 2)
    self.assertIn('resnet_v2_50/block3/unit_4/bottleneck_v2/conv1/weights',
                  stderr)
    self.assertFalse(os.path.exists(out_dir))
    self.assertEqual([n for n in os.listdir(self.get_temp_dir())
                      if n.startswith('.never')], [])


if __name__ == '__main__':
  tf.test.main()
