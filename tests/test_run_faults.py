"""Bad values and set-up errors of a run: non-finite settings and steps,
snapshot costs, a model_dir or init_checkpoint that cannot be used, a
malformed colour prior. The tiny trunk and the toy tasks of test_trainer."""

import contextlib
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.tasks import base
from mtssl.training import checkpoints
from mtssl.training import run as run_lib
from mtssl.training import trainer as trainer_lib
from tests import test_trainer as helpers

_REGISTERED = contextlib.ExitStack()
make_config = helpers.make_config


def setUpModule():
  _REGISTERED.enter_context(base.temporary_tasks(helpers.A, helpers.B))


def tearDownModule():
  _REGISTERED.close()


def numbers(model_dir):
  return [n for n, _ in checkpoints.numbered(model_dir)]


class BadValuesTest(tf.test.TestCase):

  def test_non_finite_float_settings_are_refused(self):
    for field, value in (('lasso_l1', float('nan')),
                         ('max_cost', float('inf'))):
      with self.assertRaisesRegex(configs.ConfigError,
                                  f'{field} must be a finite number'):
        make_config(self.get_temp_dir(), **{field: value}).validate()
    cfg = make_config(self.get_temp_dir())
    cfg.tasks['toy_a'].learning_rate = float('nan')
    with self.assertRaisesRegex(configs.ConfigError,
                                'toy_a_learning_rate must be a finite'):
      cfg.validate()

  def test_no_checkpoint_during_a_bad_streak_or_of_non_finite_values(self):
    # toy_a's batches 2, 3 and 4 (positions 2..7) are NaN: global steps
    # 2, 4, 6; checkpoints are due at every step.
    model_dir = self.get_temp_dir()
    cfg = make_config(model_dir, steps=20, nan_at=tuple(range(2, 8)),
                      max_nonfinite_steps=3, checkpoint_every=1,
                      keep_checkpoints=2)
    with self.assertRaisesRegex(trainer_lib.NonFiniteLossError,
                                'The latest checkpoint, .*ckpt-2, was written '
                                'before the streak'):
      trainer_lib.Trainer(cfg).train()
    self.assertEqual(numbers(model_dir), [1, 2])
    # Non-finite values are never written.
    trainer = trainer_lib.Trainer(make_config(
        os.path.join(model_dir, 'other'), steps=2))
    trainer.setup()
    trainer.close_inputs()
    kernel = trainer.model.heads['toy_a'].dense.kernel
    kernel.assign(tf.fill(kernel.shape, np.float32(np.nan)))
    with self.assertLogs(level='WARNING') as logs:
      self.assertIsNone(trainer.run.save())
    self.assertTrue(any('non-finite values' in l for l in logs.output))
    self.assertEqual(numbers(os.path.join(model_dir, 'other')), [])

  def test_snapshot_cost_below_a_step_cost(self):
    cfg = make_config(self.get_temp_dir(), cost_model='paper',
                      snapshot_cost=0.001)
    cfg.tasks['toy_a'].step_cost = 0.004
    cfg.tasks['toy_b'].step_cost = 0.0001
    with self.assertRaisesRegex(configs.ConfigError,
                                'snapshot_cost 0.001 is below the cost of one '
                                'toy_a step'):
      cfg.validate()
    # Measured costs are only known while running: at most one snapshot a
    # step, numbered by the multiple crossed.
    model_dir = self.get_temp_dir()
    trainer = trainer_lib.Trainer(make_config(model_dir, steps=6,
                                              snapshot_cost=1e-12))
    trainer.train()
    snapshots = [n for n, _ in checkpoints.numbered(
        os.path.join(model_dir, 'snapshots'), 'snapshot')]
    self.assertBetween(len(snapshots), 1, 6)
    self.assertEqual(snapshots[-1], int(trainer.state.snapshots.numpy()))

  def test_final_checkpoint_is_saved_once(self):
    model_dir = self.get_temp_dir()
    original = run_lib.Run.save
    saved = []

    def save(run, *args, **kwargs):
      path = original(run, *args, **kwargs)
      if path:
        saved.append(path)
      return path

    with mock.patch.object(run_lib.Run, 'save', save):
      trainer_lib.Trainer(make_config(model_dir, steps=4,
                                      checkpoint_every=2)).train()
    self.assertLen(saved, 2, saved)
    self.assertEqual([os.path.basename(p) for p in saved], ['ckpt-2', 'ckpt-4'])


class SetupErrorsTest(tf.test.TestCase):

  def test_model_dir_that_cannot_hold_a_run(self):
    path = os.path.join(self.get_temp_dir(), 'a_file')
    with open(path, 'w') as f:
      f.write('x')
    for model_dir, message in ((path, 'is a file, not a directory'),
                               (os.path.join(path, 'run'), 'cannot be written')):
      with self.assertRaisesRegex(checkpoints.CheckpointError, message):
        run_lib.Run(make_config(model_dir)).prepare()

  def test_read_only_model_dir(self):
    parent = tempfile.mkdtemp()  # Traversable by the unprivileged user.
    self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
    os.chmod(parent, 0o755)
    model_dir = os.path.join(parent, 'read_only')
    os.makedirs(model_dir)
    os.chmod(model_dir, 0o555)
    # Root ignores permission bits: check as an unprivileged user.
    as_nobody = os.geteuid() == 0
    if as_nobody:
      os.seteuid(65534)
    try:
      with self.assertRaisesRegex(checkpoints.CheckpointError,
                                  'read_only.* cannot be written: Permission '
                                  'denied'):
        checkpoints.check_model_dir(model_dir)
    finally:
      if as_nobody:
        os.seteuid(0)

  def test_init_checkpoint_missing_or_garbage(self):
    garbage = os.path.join(self.get_temp_dir(), 'garbage')
    with open(garbage + '.index', 'wb') as f:
      f.write(b'not a checkpoint index')
    for path, message in (('/no/such/checkpoint', 'does not exist'),
                          (garbage, f'init_checkpoint {garbage!r}: ')):
      trainer = trainer_lib.Trainer(make_config(
          os.path.join(self.get_temp_dir(), 'run'), init_checkpoint=path))
      with self.assertRaisesRegex(checkpoints.CheckpointError,
                                  message) as raised:
        trainer.setup()
      self.assertNotIn('\n', str(raised.exception))

  def test_malformed_colour_prior(self):
    prior = os.path.join(self.get_temp_dir(), 'prior.npy')
    with open(prior, 'wb') as f:
      f.write(b'\x93NUMPY garbage')
    cfg = helpers.real_config(self.get_temp_dir(), steps=1)
    cfg.tasks['col'].config.prior_path = prior
    with self.assertRaisesRegex(configs.ConfigError,
                                f"col: Colour prior '{prior}' is not a "
                                'readable'):
      run_lib.Run(cfg).prepare()


if __name__ == '__main__':
  tf.test.main()
