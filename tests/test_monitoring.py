"""What a short default-like run (rp + col, tiny trunk) records: its event
files read back (image tags of every task, no doubled tags, the input-wait
scalar), one final checkpoint, a profile, the configuration and a warning on
a resume with another one."""

import collections
import glob
import json
import os
from unittest import mock

import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.training import monitoring
from mtssl.training import trainer as trainer_lib
from tests import test_trainer


def read_events(model_dir):
  """{tag: [step, ...]} of every summary under <model_dir>/train."""
  tags = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(model_dir, 'train', 'events.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags[value.tag].append(event.step)
  return tags


def scalar_values(model_dir, tag):
  out = []
  for path in glob.glob(os.path.join(model_dir, 'train', 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out.append(float(tf.make_ndarray(value.tensor)))
  return out


class RunRecordsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), 'records')
    # Round-robin rp, col: rp makes the odd global steps, col the even ones,
    # and image_summary_every=2 is a multiple of the number of tasks.
    cls.config = test_trainer.real_config(
        cls.model_dir, steps=6, checkpoint_every=3, log_every=3,
        summary_every=3, image_summary_every=2, profile_steps=(2, 3))
    trainer = trainer_lib.Trainer(cls.config)
    trainer.setup()
    save = trainer.run.manager.save
    with mock.patch.object(trainer.run.manager, 'save',
                           side_effect=save) as saved, \
        mock.patch.object(trainer_lib.logging, 'info',
                          wraps=trainer_lib.logging.info) as info:
      cls.result = trainer.train()
    cls.saves = [c.kwargs['checkpoint_number'] for c in saved.call_args_list]
    cls.log = [call.args[0] % call.args[1:] for call in info.call_args_list]
    cls.tags = read_events(cls.model_dir)

  def test_every_task_writes_its_images(self):
    # Each task at its first step past every multiple of 2: col (even steps)
    # at 2, 4, 6; rp (odd steps) at 3, 5.
    self.assertEqual(self.tags['col/gray_prediction_truth'], [2, 4, 6])
    self.assertEqual(self.tags['rp/pairs'], [3, 5])

  def test_no_doubled_tags(self):
    for tag, steps in self.tags.items():
      parts = tag.split('/')
      self.assertNotEqual(parts[0], parts[1] if len(parts) > 1 else None, tag)
      self.assertEqual(len(steps), len(set(steps)), f'{tag} at {steps}')
    for name in ('rp', 'col'):
      self.assertIn(f'{name}/loss', self.tags)
      self.assertIn(f'{name}/accuracy', self.tags)

  def test_input_wait_is_written_and_logged(self):
    for name in ('rp', 'col'):
      values = scalar_values(self.model_dir, f'{name}/input_wait_fraction')
      self.assertLen(values, 2)  # steps 3 and 6
      for v in values:
        self.assertBetween(v, 0.0, 1.0)
    progress = [line for line in self.log if line.startswith('[6/6]')]
    self.assertLen(progress, 1, self.log)
    self.assertRegex(progress[0], r'rp 3 st .* input \d+% .*col 3 st .* '
                     r'input \d+%')

  def test_final_checkpoint_is_saved_once(self):
    self.assertEqual(self.saves, [3, 6])
    self.assertEqual(self.result['checkpoint'],
                     os.path.join(self.model_dir, 'ckpt-6'))

  def test_profile_is_written(self):
    profiles = glob.glob(os.path.join(self.model_dir, 'plugins', 'profile',
                                      '*', '*.xplane.pb'))
    self.assertLen(profiles, 1)
    self.assertGreater(os.path.getsize(profiles[0]), 0)

  def test_config_is_saved_and_a_changed_resume_warns(self):
    with open(os.path.join(self.model_dir, monitoring.CONFIG_FILE)) as f:
      saved = json.load(f)
    self.assertEqual(saved, monitoring.config_dict(self.config))
    self.assertEqual(saved['tasks']['rp']['config']['unit_depths'], [32, 16])
    changed = test_trainer.real_config(
        self.model_dir, steps=8, checkpoint_every=3, log_every=3,
        summary_every=3, image_summary_every=2)
    changed.tasks['col'].learning_rate = 5e-4
    with self.assertLogs(level='WARNING') as logs:
      trainer = trainer_lib.Trainer(changed).setup()
    trainer.close_inputs()
    warning = [r for r in logs.output if 'configured differently' in r]
    self.assertLen(warning, 1, logs.output)
    for change in ('steps: 6 -> 8', 'profile_steps: [2, 3] -> None',
                   'tasks.col.learning_rate: 0.001 -> 0.0005'):
      self.assertIn(change, warning[0])
    self.assertEqual(trainer.config_changes and len(trainer.config_changes), 3)
    self.assertIsNotNone(trainer.run.resumed_from)


class ProfileStepsFlagTest(tf.test.TestCase):

  def test_bad_values_are_one_line_errors(self):
    for steps in ((5, 3), (0, 2), (4,), (1, 2, 3)):
      cfg = test_trainer.real_config('/tmp/unused', steps=4,
                                     profile_steps=steps)
      with self.assertRaisesRegex(configs.ConfigError,
                                  r'^profile_steps must be two global steps '
                                  r'A,B with 1 <= A <= B, got [\d,]+\.$'):
        cfg.validate()

  def test_flag_reaches_the_config(self):
    from mtssl import train  # pylint: disable=g-import-not-at-top
    try:
      for value, expected in (('4,9', (4, 9)), ('4,x', 'expected'),
                              ('9,4', '1 <= A <= B')):
        train.FLAGS.unparse_flags()
        train.FLAGS(['mtssl.train', f'--profile_steps={value}'])
        if isinstance(expected, tuple):
          self.assertEqual(train.config_from_flags().profile_steps, expected)
        else:
          with self.assertRaisesRegex(configs.ConfigError,
                                      f'profile_steps.*{expected}'):
            train.config_from_flags()
    finally:
      train.FLAGS.unparse_flags()


class ConfigDifferencesTest(tf.test.TestCase):

  def test_lists_changed_added_and_removed_leaves(self):
    old = {'steps': 3, 'tasks': {'rp': {'lr': 1}}}
    new = {'steps': 4, 'tasks': {'rp': {'lr': 1}, 'col': {'lr': 2}}}
    self.assertEqual(monitoring.config_differences(old, new),
                     ['steps: 3 -> 4', 'tasks.col.lr: (absent) -> 2'])
    self.assertEqual(monitoring.config_differences(new, new), [])
    self.assertEqual(monitoring.config_differences(old, {'steps': 3}),
                     ['tasks.rp.lr: 1 -> (absent)'])


if __name__ == '__main__':
  tf.test.main()
