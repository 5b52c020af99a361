"""The lasso over block-3 units and the multi-task model's plumbing."""

import numpy as np
import tensorflow as tf

from mtssl.models import lasso as lasso_lib
from mtssl.models import multitask as model_lib
from mtssl.training import optimizers
from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from mtssl.data import sources
from mtssl.training import step as step_lib
from tests import toy_task


class UnitLassoTest(tf.test.TestCase):

  def units(self, n=4):
    rng = np.random.default_rng(0)
    return {f'u{i}': tf.constant(rng.normal(size=[2, 3, 3, 5]), tf.float32)
            for i in range(n)}

  def test_starts_as_the_last_unit_and_combines_linearly(self):
    units = self.units()
    layer = lasso_lib.UnitLasso(list(units), l1_weight=0.1)
    self.assertAllClose(layer(units), units['u3'])
    layer.v.assign([1.0, -2.0, 0.0, 2.0])
    alpha = np.array([1.0, -2.0, 0.0, 2.0]) / 3.0
    expected = sum(a * units[f'u{i}'] for i, a in enumerate(alpha))
    self.assertAllClose(layer(units), expected, atol=1e-6)
    self.assertAllClose(layer.losses[-1], 0.1 * np.abs(alpha).sum())

  def test_unit_norm_holds_after_optimization(self):
    units = self.units()
    layer = lasso_lib.UnitLasso(list(units), l1_weight=0.5)
    opt = optimizers.TF1RMSProp(0.05)
    for _ in range(20):
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(layer(units) * units['u0']) + tf.add_n(layer.losses)
      opt.apply_gradients(zip(tape.gradient(loss, [layer.v]), [layer.v]))
    self.assertAllClose(tf.reduce_sum(layer.alpha ** 2), 1.0, atol=1e-6)
    self.assertNotAllClose(layer.alpha, [0.0, 0.0, 0.0, 1.0])

  def test_mismatched_units_and_missing_names(self):
    units = self.units(2)
    units['u1'] = tf.zeros([2, 2, 2, 5])
    with self.assertRaisesRegex(ValueError, 'output_stride 8 or 16'):
      lasso_lib.UnitLasso(['u0', 'u1'])(units)
    with self.assertRaisesRegex(ValueError, 'no end point'):
      lasso_lib.UnitLasso(['u0', 'nope'])(units)


class MultiTaskModelTest(tf.test.TestCase):

  def build(self, lasso_l1=None):
    a, b = toy_task.toy_task_class('toy_a'), toy_task.toy_task_class('toy_b')
    tasks = {'toy_a': a(toy_task.ToyConfig()), 'toy_b': b(toy_task.ToyConfig())}
    trunk = resnet_lib.trunk_from_name('resnet_v2_tiny', 8)
    model = model_lib.MultiTaskModel(trunk, tasks, lasso_l1=lasso_l1)
    src = sources.SyntheticImageSource(40, 40)
    batches = {n: next(iter(t.make_dataset(src, 2, seed=0)))
               for n, t in tasks.items()}
    model.build_all({n: f for n, (f, _) in batches.items()})
    return model, batches

  def test_task_variables_and_regularization(self):
    model, _ = self.build(lasso_l1=0.01)
    a_vars = {v.ref() for v in model.task_variables('toy_a')}
    self.assertTrue(all(v.ref() in a_vars for v in model.trunk.trainable_variables))
    self.assertIn(model.lasso['toy_a'].v.ref(), a_vars)
    self.assertNotIn(model.lasso['toy_b'].v.ref(), a_vars)
    self.assertFalse(any(v.ref() in a_vars
                         for v in model.heads['toy_b'].trainable_variables))
    # Weight decay of the trunk + the task's lasso L1 (alpha = e_last: 0.01).
    expected = float(tf.add_n(model.trunk.losses)) + 0.01
    self.assertAllClose(float(model.regularization_loss('toy_a')), expected,
                        rtol=1e-5)
    self.assertEqual(sorted(model.checkpoint_items), ['backbone', 'heads', 'lasso'])

  def test_lasso_feeds_the_head_a_unit_combination(self):
    model, batches = self.build(lasso_l1=0.0)
    features = batches['toy_a'][0]
    plain = model.trunk(features['image'], training=False)
    units = model.trunk.unit_names('block3')
    model.lasso['toy_a'].v.assign(tf.one_hot(0, len(units)))
    rep = model.representation('toy_a', features['image'], training=False)
    self.assertAllClose(rep, plain[units[0]])

  def test_trunk_restores_alone_from_a_model_checkpoint(self):
    model, batches = self.build()
    step = step_lib.TaskTrainStep(model, 'toy_a', optimizers.TF1RMSProp(1e-2))
    step(*batches['toy_a'])
    prefix = tf.train.Checkpoint(**model.checkpoint_items).save(
        f'{self.get_temp_dir()}/model')
    trunk = resnet_lib.trunk_from_name('resnet_v2_tiny', 8)
    slim_checkpoint.restore_trunk(trunk, prefix)
    for a, b in zip(trunk.variables, model.trunk.variables):
      self.assertAllEqual(a, b)


if __name__ == '__main__':
  tf.test.main()
