"""What a run's checkpoints survive: a lost or damaged index, a damaged
latest checkpoint, a failed write, a changed configuration on resume. Real
files, the tiny trunk and the toy tasks of test_trainer."""

import contextlib
import glob
import hashlib
import os
import resource
import shutil
import signal
import tempfile
from unittest import mock

import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.tasks import base
from mtssl.training import checkpoints
from mtssl.training import trainer as trainer_lib
from tests import test_trainer as helpers
from tests import toy_task

C = toy_task.toy_task_class('toy_c')
_REGISTERED = contextlib.ExitStack()
make_config = helpers.make_config


def setUpModule():
  _REGISTERED.enter_context(base.temporary_tasks(helpers.A, helpers.B, C))


def tearDownModule():
  _REGISTERED.close()


def digest(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def numbers(model_dir):
  return [n for n, _ in checkpoints.numbered(model_dir)]


def _run(model_dir, steps, **overrides):
  overrides.setdefault('checkpoint_every', 2)
  overrides.setdefault('keep_checkpoints', 5)
  trainer = trainer_lib.Trainer(make_config(model_dir, steps=steps,
                                            **overrides))
  trainer.train()
  return trainer


class SharedRunsTestCase(tf.test.TestCase):
  """Runs made once per class ({name: make_config arguments}); each test
  damages or resumes its own copy."""

  RUNS = {}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.runs = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.runs, ignore_errors=True)
    for name, kwargs in cls.RUNS.items():
      trainer_lib.Trainer(make_config(os.path.join(cls.runs, name),
                                      **kwargs)).train()

  def copy_of_run(self, name):
    model_dir = os.path.join(self.get_temp_dir(), 'run')
    shutil.copytree(os.path.join(self.runs, name), model_dir)
    return model_dir


class IndexAndDamageTest(SharedRunsTestCase):

  RUNS = {str(steps): dict(steps=steps, checkpoint_every=2, keep_checkpoints=5)
          for steps in (2, 4)}

  def test_lost_or_unparsable_index_resumes_from_the_newest_by_scanning(self):
    original = os.path.join(self.runs, '4')
    self.assertEqual(numbers(original), [2, 4])
    for damage in ('missing', 'garbage'):
      model_dir = os.path.join(self.get_temp_dir(), damage)
      shutil.copytree(original, model_dir)
      kept = {n: digest(p + '.data-00000-of-00001')
              for n, p in checkpoints.numbered(model_dir)}
      index = os.path.join(model_dir, 'checkpoint')
      if damage == 'missing':
        os.remove(index)
      else:
        with open(index, 'w') as f:
          f.write('model_checkpoint_path: \x00{{{ not a text proto')
      with self.assertLogs(level='WARNING') as logs:
        trainer = _run(model_dir, 6)
      self.assertTrue(trainer.run.resumed_from.endswith('ckpt-4'), damage)
      self.assertTrue(any('found by scanning' in l for l in logs.output))
      self.assertEqual(numbers(model_dir), [2, 4, 6])
      for n, p in checkpoints.numbered(model_dir):
        if n in kept:  # Never overwritten.
          self.assertEqual(digest(p + '.data-00000-of-00001'), kept[n])
      self.assertEqual(tf.train.latest_checkpoint(model_dir),
                       os.path.join(model_dir, 'ckpt-6'))

  def test_damaged_latest_checkpoint_falls_back_to_the_previous(self):
    model_dir = self.copy_of_run('4')
    data = os.path.join(model_dir, 'ckpt-4.data-00000-of-00001')
    size = os.path.getsize(data)
    with open(data, 'r+b') as f:
      f.truncate(size // 2)
    with self.assertLogs(level='WARNING') as logs:
      trainer = trainer_lib.Trainer(make_config(model_dir, steps=5))
      trainer.setup()
      trainer.close_inputs()
    self.assertTrue(trainer.run.resumed_from.endswith('ckpt-2'))
    self.assertEqual(int(trainer.state.global_step.numpy()), 2)
    self.assertTrue(any('damaged' in l for l in logs.output), logs.output)
    # The damaged one is kept aside, where no save can overwrite it.
    self.assertEqual(numbers(model_dir), [2])
    self.assertEqual(
        os.path.getsize(os.path.join(model_dir, checkpoints.SET_ASIDE,
                                     'ckpt-4.data-00000-of-00001')), size // 2)

  def test_no_readable_checkpoint_is_an_error_naming_the_directory(self):
    model_dir = self.copy_of_run('2')
    with open(os.path.join(model_dir, 'ckpt-2.index'), 'wb') as f:
      f.write(b'garbage')
    with self.assertRaisesRegex(checkpoints.CheckpointError,
                                f'model_dir {model_dir!r} holds no readable '
                                r'checkpoint: checkpoints ckpt-2 \('):
      trainer_lib.Trainer(make_config(model_dir, steps=4)).setup()
    self.assertTrue(os.path.exists(os.path.join(model_dir, 'ckpt-2.index')))

  def test_failed_write_keeps_the_previous_checkpoint(self):
    model_dir = self.copy_of_run('2')
    data_size = os.path.getsize(
        os.path.join(model_dir, 'ckpt-2.data-00000-of-00001'))
    # A real write failure: files of this process may not grow beyond half
    # a checkpoint (EFBIG, as ENOSPC on a full disk).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    trainer = trainer_lib.Trainer(make_config(model_dir, steps=4,
                                              checkpoint_every=1))
    trainer.setup()
    try:
      resource.setrlimit(resource.RLIMIT_FSIZE, (data_size // 2, hard))
      with self.assertRaisesRegex(
          checkpoints.CheckpointError,
          r'Could not write checkpoint .*ckpt-3: .*; the latest checkpoint '
          r'is still .*ckpt-2\.') as raised:
        trainer.train()
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
      signal.signal(signal.SIGXFSZ, previous)
    self.assertNotIn('\n', str(raised.exception))
    self.assertEqual(tf.train.latest_checkpoint(model_dir),
                     os.path.join(model_dir, 'ckpt-2'))
    self.assertIsNone(checkpoints.damage(os.path.join(model_dir, 'ckpt-2')))
    self.assertEqual(glob.glob(os.path.join(model_dir, '*ckpt-3*')), [])
    self.assertEqual(glob.glob(os.path.join(model_dir, '*_temp*')), [])


class ResumeChangesTest(SharedRunsTestCase):

  RUNS = {'2': dict(steps=2)}

  def test_learning_rate_given_on_resume_wins_and_is_logged(self):
    model_dir = self.copy_of_run('2')
    cfg = make_config(model_dir, steps=4)
    cfg.tasks['toy_a'].learning_rate = 5e-3
    trainer = trainer_lib.Trainer(cfg)
    with self.assertLogs(level='WARNING') as logs:
      trainer.train()
    self.assertTrue(any('toy_a: learning rate 0.005 (configured) replaces '
                        '0.001' in l for l in logs.output), logs.output)
    self.assertFalse(any('toy_b: learning rate' in l for l in logs.output))
    saved = checkpoints.saved_value(
        os.path.join(model_dir, 'ckpt-4'),
        'optimizers/toy_a/learning_rate/.ATTRIBUTES/VARIABLE_VALUE')
    self.assertAllClose(saved, 5e-3)

  def test_resume_with_other_tasks_or_trunk_is_refused_in_one_line(self):
    model_dir = self.copy_of_run('2')
    dropped = make_config(model_dir, steps=4)
    del dropped.tasks['toy_b']
    added = make_config(model_dir, steps=4)
    added.tasks['toy_c'] = configs.TaskRun(config=toy_task.ToyConfig(
        batch_size=2))
    for cfg in (dropped, added):
      with self.assertRaisesRegex(
          checkpoints.CheckpointError,
          'holds a run of tasks toy_a,toy_b, not .*resume with '
          '--tasks=toy_a,toy_b'):
        trainer_lib.Trainer(cfg).setup()
    trainer = trainer_lib.Trainer(make_config(model_dir, steps=4,
                                              trunk='resnet_v2_small'))
    with self.assertRaisesRegex(checkpoints.CheckpointError,
                                'does not fit this model') as raised:
      trainer.setup()
    self.assertNotIn('\n', str(raised.exception))
    self.assertEqual(trainer.iterators, {})  # Closed on the error path.


class NonFiniteCheckTest(tf.test.TestCase):

  def test_local_and_remote_checks_name_the_same_variables(self):
    variables = [tf.Variable([1.0, 2.0], name='ok'),
                 tf.Variable([[1.0, float('nan')]], name='nan'),
                 tf.Variable(float('inf'), name='inf'),
                 tf.Variable(3, name='count')]  # not floating: not checked
    expected = ['nan:0', 'inf:0']
    self.assertEqual(checkpoints.non_finite(variables), expected)
    # Variables on a parameter server are checked by one traced function.
    with mock.patch.object(checkpoints, '_remote', return_value=True):
      self.assertEqual(checkpoints.non_finite(variables), expected)
      self.assertEqual(checkpoints.non_finite(variables[:1]), [])


if __name__ == '__main__':
  tf.test.main()
