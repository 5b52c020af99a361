"""The single-machine trainer with a tiny trunk.

The paper's training structure (one active head per step, a separate optimizer
per task, the trunk shared) and resume exactness are checked on the real rp
and col tasks at small sizes; compute accounting and non-finite handling on
toy tasks (a NaN can be injected into their data).
"""

import contextlib
import os
import shutil

import numpy as np
import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.tasks import base
from mtssl.tasks import col
from mtssl.tasks import rp
from mtssl.training import trainer as trainer_lib
from tests import toy_task

A, B = toy_task.toy_task_class('toy_a'), toy_task.toy_task_class('toy_b')
_REGISTERED = contextlib.ExitStack()


def setUpModule():
  _REGISTERED.enter_context(base.temporary_tasks(A, B))


def tearDownModule():
  _REGISTERED.close()


def make_config(model_dir, steps=6, nan_at=(), **overrides):
  tasks = {
      'toy_a': configs.TaskRun(config=toy_task.ToyConfig(batch_size=2,
                                                         nan_at_positions=nan_at),
                               learning_rate=1e-3),
      'toy_b': configs.TaskRun(config=toy_task.ToyConfig(batch_size=3),
                               learning_rate=2e-3),
  }
  values = dict(tasks=tasks, model_dir=model_dir, trunk='resnet_v2_tiny',
                output_stride=8, steps=steps, checkpoint_every=1000,
                log_every=2, summary_every=2, image_summary_every=1000)
  values.update(overrides)
  return configs.TrainConfig(**values)


def real_config(model_dir, steps, **overrides):
  """rp + col at small sizes: tiny trunk, narrow heads, small inputs."""
  tasks = {
      'rp': configs.TaskRun(config=rp.RPConfig(
          batch_size=4, patch_size=32, gap=16, jitter=3, min_pixels=20000,
          max_pixels=30000, unit_depths=(32, 16), unit_bottleneck=8,
          fc_bottleneck=16)),
      'col': configs.TaskRun(config=col.ColConfig(
          batch_size=2, image_size=64, head_widths=(32, 32))),
  }
  values = dict(tasks=tasks, model_dir=model_dir, trunk='resnet_v2_tiny',
                output_stride=8, steps=steps, checkpoint_every=1000,
                log_every=2, summary_every=2, image_summary_every=2)
  values.update(overrides)
  return configs.TrainConfig(**values)


def snapshot(variables):
  return {v.name: v.numpy() for v in variables}


def changed(before, variables):
  return [v.name for v in variables if np.any(before[v.name] != v.numpy())]


class TrainerTest(tf.test.TestCase):

  def test_heads_change_only_on_their_own_steps(self):
    trainer = trainer_lib.Trainer(real_config(self.get_temp_dir(), steps=1))
    trainer.setup()
    model = trainer.model
    trunk = model.trunk.trainable_variables
    head_a = model.heads['rp'].trainable_variables
    head_b = model.heads['col'].trainable_variables
    for name, own, other in (('rp', head_a, head_b), ('col', head_b, head_a)):
      before = snapshot(trunk + own + other)
      features, labels = trainer._next_batch(name)  # pylint: disable=protected-access
      self.assertTrue(bool(trainer.steps[name](features, labels)['finite']))
      # Every kernel, gamma and beta moves; a conv bias followed by a
      # training-mode batch norm has an exactly zero gradient and may not.
      moved = changed(before, own)
      self.assertTrue(all(v.name in moved for v in own if 'bias' not in v.name),
                      [v.name for v in own if v.name not in moved])
      self.assertEqual(changed(before, other), [])
      self.assertLen(changed(before, trunk), len(trunk))
    # Each task has its own optimizer, with slots over the trunk and its head.
    trainer.close_inputs()
    opt_a, opt_b = trainer.optimizers['rp'], trainer.optimizers['col']
    self.assertIsNot(opt_a, opt_b)
    kernel = model.trunk.conv1.conv.kernel
    self.assertIsNot(opt_a.get_slot(kernel, 'rms'), opt_b.get_slot(kernel, 'rms'))
    self.assertNotAllClose(opt_a.get_slot(kernel, 'rms'),
                           opt_b.get_slot(kernel, 'rms'))
    with self.assertRaises(KeyError):
      opt_a.get_slot(head_b[0], 'rms')

  def test_round_robin_steps_costs_and_snapshots(self):
    cfg = make_config(self.get_temp_dir(), steps=6, cost_model='paper',
                      snapshot_cost=0.01)
    cfg.tasks['toy_a'].step_cost = 0.004
    cfg.tasks['toy_b'].step_cost = 0.001
    result = trainer_lib.Trainer(cfg).train()
    self.assertEqual(result['task_steps'], {'toy_a': 3, 'toy_b': 3})
    self.assertAllClose(result['cost_hours'], {'toy_a': 0.012, 'toy_b': 0.003})
    # The total reaches 0.01 at step 5 (0.004*3 + 0.001*2 = 0.014 > 0.01):
    # one snapshot.
    snapshots = tf.train.get_checkpoint_state(
        os.path.join(cfg.model_dir, 'snapshots'))
    self.assertLen(snapshots.all_model_checkpoint_paths, 1)
    self.assertTrue(tf.io.gfile.exists(os.path.join(cfg.model_dir, 'train')))

  def test_weighted_schedule_is_seeded(self):
    names = ['a', 'b']
    order = [trainer_lib.task_schedule(names, 'weighted', [3, 1], 7, g)
             for g in range(400)]
    again = [trainer_lib.task_schedule(names, 'weighted', [3, 1], 7, g)
             for g in range(400)]
    self.assertEqual(order, again)
    self.assertAllClose(order.count('a') / 400, 0.75, atol=0.06)
    self.assertNotEqual(order, [trainer_lib.task_schedule(names, 'weighted',
                                                          [3, 1], 8, g)
                                for g in range(400)])

  def test_resume_reproduces_the_uninterrupted_run(self):
    # The uninterrupted run saves at step 3 on its way to 6; a directory
    # holding only that checkpoint is a run stopped there.
    straight_dir = os.path.join(self.get_temp_dir(), 'straight')
    straight = trainer_lib.Trainer(real_config(straight_dir, steps=6,
                                               checkpoint_every=3))
    straight_result = straight.train()
    expected = snapshot(straight.model.variables)

    resumed_dir = os.path.join(self.get_temp_dir(), 'resumed')
    os.makedirs(resumed_dir)
    for path in tf.io.gfile.glob(os.path.join(straight_dir, 'ckpt-3.*')):
      shutil.copy(path, resumed_dir)
    tf.compat.v1.train.update_checkpoint_state(
        resumed_dir, os.path.join(resumed_dir, 'ckpt-3'))
    second = trainer_lib.Trainer(real_config(resumed_dir, steps=6,
                                             checkpoint_every=3))
    result = second.train()
    self.assertEqual(second.run.resumed_from,
                     os.path.join(resumed_dir, 'ckpt-3'))
    self.assertEqual(result['task_steps'], straight_result['task_steps'])
    for name, value in snapshot(second.model.variables).items():
      self.assertAllEqual(value, expected[name], msg=name)
    for name in ('rp', 'col'):
      self.assertEqual(int(second.state.positions[name].numpy()),
                       int(straight.state.positions[name].numpy()))

  def test_resume_with_another_seed_is_refused(self):
    model_dir = self.get_temp_dir()
    trainer_lib.Trainer(make_config(model_dir, steps=2)).train()
    with self.assertRaisesRegex(configs.ConfigError, 'seed 0, not 5'):
      trainer_lib.Trainer(make_config(model_dir, steps=4, seed=5)).setup()

  def test_native_atrous_trains_under_xla_and_needs_it_on_cpu(self):
    # One step: each task's step is its own XLA compilation of the same
    # dilated trunk (about 10 CPU-s each), and one shows that it trains.
    cfg = make_config(self.get_temp_dir(), steps=1, native_atrous=True,
                      xla=True)
    trainer = trainer_lib.Trainer(cfg)
    result = trainer.train()
    self.assertEqual(result['task_steps'], {'toy_a': 1, 'toy_b': 0})
    self.assertEqual(result['skipped_steps'], {'toy_a': 0, 'toy_b': 0})
    self.assertTrue(trainer.model.trunk.native_atrous)
    if not tf.config.list_physical_devices('GPU'):
      with self.assertRaisesRegex(configs.ConfigError, 'native_atrous needs'):
        trainer_lib.Trainer(make_config(self.get_temp_dir(), steps=2,
                                        native_atrous=True)).setup()

  def test_non_finite_steps_are_skipped_then_stop_the_run(self):
    # toy_a's batches are positions (0,1), (2,3), ...: NaN at 2 and 5 spoils
    # its 2nd and 3rd batches; they are skipped and training continues.
    cfg = make_config(self.get_temp_dir(), steps=10, nan_at=(2, 5))
    result = trainer_lib.Trainer(cfg).train()
    self.assertEqual(result['skipped_steps'], {'toy_a': 2, 'toy_b': 0})
    self.assertEqual(result['task_steps'], {'toy_a': 3, 'toy_b': 5})
    # Three bad batches in a row with max_nonfinite_steps=3: a clear stop.
    cfg = make_config(os.path.join(self.get_temp_dir(), 'stop'), steps=20,
                      nan_at=tuple(range(2, 8)), max_nonfinite_steps=3)
    with self.assertRaisesRegex(trainer_lib.NonFiniteLossError,
                                'toy_a: 3 consecutive non-finite steps'):
      trainer_lib.Trainer(cfg).train()


if __name__ == '__main__':
  tf.test.main()
