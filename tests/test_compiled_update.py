"""The guarded update's variants compute what the original update computes.

Each variant of core.GuardedUpdate (fused finite check, deferred moving
statistics, branch-free select) runs a few steps of a tiny trunk and a toy
head, one step of them non-finite, and must leave the same weights, optimizer
slots and batch-norm moving statistics as the original update (per-gradient
check, snapshot and restore, conditional apply).
"""

import os
import sys

import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.backbones import resnet_v2
from mtssl.data import sources
from mtssl.models import multitask as model_lib
from mtssl.training import core
from mtssl.training import optimizers
from mtssl.training import step as step_lib
from tests import toy_task

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
import hlo_census  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = [resnet_v2.Block('block1', 4, 1, 2), resnet_v2.Block('block2', 8, 2, 2)]
ORIGINAL = {'finite_check': 'per_gradient', 'moving_statistics': 'snapshot',
            'guard': 'cond'}
DEFAULT = {}  # TaskTrainStep's: fused check, snapshot, conditional.
DEFERRED = {'moving_statistics': 'deferred'}
SELECT = {'moving_statistics': 'deferred', 'guard': 'select'}
STEPS = 3
NAN_STEP = 1  # The second step sees positions 4, 5: NaN images.


def train(jit, variant):
  """(applied flags, losses, final state arrays, step, a batch)."""
  tf_keras.utils.set_random_seed(0)
  trunk = resnet_v2.ResNetV2(TINY, output_stride=8, scope='tiny')
  task = toy_task.ToyTask(toy_task.ToyConfig(nan_at_positions=(4, 5)))
  model = model_lib.MultiTaskModel(trunk, {'toy': task})
  it = iter(task.make_dataset(sources.SyntheticImageSource(48, 48), 2, seed=0))
  first = next(it)
  model.build_all({'toy': first[0]})
  opt = optimizers.TF1RMSProp(1e-2)
  step = step_lib.TaskTrainStep(model, 'toy', opt, jit_compile=jit, **variant)
  applied, losses = [], []
  for _ in range(STEPS):
    out = step(*next(it))
    applied.append(bool(out['finite']))
    losses.append(float(out['loss']))
  state = {v.name: v.numpy() for v in model.variables + opt.variables()}
  return applied, losses, state, step, first


class VariantsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.runs = {(jit, name): train(jit, variant)
                for jit, name, variant in ((False, 'original', ORIGINAL),
                                           (True, 'original', ORIGINAL),
                                           (False, 'default', DEFAULT),
                                           (True, 'default', DEFAULT),
                                           (False, 'deferred', DEFERRED),
                                           (True, 'select', SELECT))}

  def _compare(self, got, want):
    self.assertEqual(got[0], [i != NAN_STEP for i in range(STEPS)])
    self.assertEqual(want[0], got[0])
    self.assertEqual(sorted(got[2]), sorted(want[2]))
    self.assertTrue(any('moving_mean' in n for n in got[2]))
    self.assertTrue(any('/rms' in n for n in got[2]))
    for name, value in want[2].items():
      self.assertAllEqual(got[2][name], value, msg=name)

  def test_fused_check_is_bit_exact(self):
    for jit in (False, True):
      with self.subTest(jit=jit):
        self.assertEqual(self.runs[jit, 'default'][3].update.finite_check,
                         'fused')
        self._compare(self.runs[jit, 'default'], self.runs[jit, 'original'])

  def test_deferred_statistics_are_bit_exact(self):
    self._compare(self.runs[False, 'deferred'], self.runs[False, 'original'])

  def test_select_guard_and_deferred_statistics_are_bit_exact_under_xla(self):
    self._compare(self.runs[True, 'select'], self.runs[True, 'original'])

  def test_select_guard_needs_plain_tf1_rmsprop(self):
    var = tf.Variable([1.0])
    with self.assertRaisesRegex(ValueError, 'guard=select needs a TF1RMSProp'):
      core.GuardedUpdate(tf_keras.mixed_precision.LossScaleOptimizer(
          optimizers.TF1RMSProp(0.1)), [var], guard='select')
    with self.assertRaisesRegex(ValueError, 'guard must be one of'):
      core.GuardedUpdate(optimizers.TF1RMSProp(0.1), [var], guard='maybe')

  def test_deferred_needs_the_layers_that_own_the_statistics(self):
    update = self.runs[False, 'deferred'][3].update
    layers = update.batch_norm_layers
    self.assertLen(layers, len(update.moving) // 2)
    with self.assertRaisesRegex(ValueError, 'must own exactly'):
      core.GuardedUpdate(update.optimizer, update.variables, update.moving,
                         batch_norm_layers=layers[1:],
                         moving_statistics='deferred')

  def test_variants_remove_their_operations(self):
    census = {}
    for name in ('original', 'select'):
      _, _, _, step, (features, labels) = self.runs[True, name]
      census[name] = hlo_census.census(
          step._step.experimental_get_compiler_ir(  # pylint: disable=protected-access
              features, labels)(stage='hlo'))
    gradients = len(self.runs[True, 'original'][3].variables)
    # One is-finite for the loss, then one per gradient or one for them all.
    self.assertEqual(census['original']['by_kind']['is-finite'], gradients + 1)
    self.assertEqual(census['select']['by_kind']['is-finite'], 2)
    # The original applies the optimizer inside the conditional's branch,
    # the select guard outside any.
    self.assertGreater(census['original']['in_branches']['optimizer'],
                       gradients)
    self.assertNotIn('optimizer', census['select']['in_branches'])
    self.assertGreater(census['select']['by_part']['optimizer']['select'],
                       3 * gradients - 1)


class AllFiniteTest(tf.test.TestCase):

  def test_any_non_finite_element_anywhere(self):
    tensors = [tf.ones([3, 3]), tf.zeros([5]), tf.fill([2, 2, 2], 3e38)]
    # Large finite values whose sum overflows are still finite.
    self.assertTrue(bool(core.all_finite(tensors)))
    self.assertTrue(bool(core.all_finite([])))
    for bad in (np.inf, -np.inf, np.nan):
      for index in range(len(tensors)):
        broken = list(tensors)
        flat = tf.reshape(broken[index], [-1])
        flat = tf.tensor_scatter_nd_update(flat, [[flat.shape[0] - 1]], [bad])
        broken[index] = tf.reshape(flat, tensors[index].shape)
        self.assertFalse(bool(core.all_finite(broken)), msg=(bad, index))
    mixed = [tf.constant([1.0, 2.0], tf.bfloat16), tf.constant([1e300], tf.float64)]
    self.assertTrue(bool(core.all_finite(mixed)))  # Not cast to float32.
    self.assertFalse(bool(core.all_finite(
        mixed + [tf.constant([1.0, np.nan], tf.bfloat16)])))


if __name__ == '__main__':
  tf.test.main()
