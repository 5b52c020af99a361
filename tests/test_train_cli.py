"""`python -m mtssl.train`: flags, flagfiles, validation and exit codes."""

import contextlib
import glob
import io
import os
import subprocess
import sys
from unittest import mock

import tensorflow as tf
from absl.testing import parameterized

from mtssl import tasks as tasks_lib
from mtssl import train
from mtssl.configs import base as config_base
from mtssl.configs import training as configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, 'flags', '*.flags')))


def parse(*args):
  train.FLAGS.unparse_flags()
  train.FLAGS(['mtssl.train', *args])
  try:
    return train.config_from_flags()
  finally:
    train.FLAGS.unparse_flags()


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'mtssl.train', *args],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))


class FlagsTest(tf.test.TestCase, parameterized.TestCase):

  def test_default_is_the_cpu_preset(self):
    config = parse()
    self.assertEqual(list(config.tasks), ['rp', 'col'])
    self.assertEqual(config.trunk, 'resnet_v2_small')
    self.assertEqual(config.tasks['col'].config.head_widths, (256, 256))
    self.assertEqual(config.tasks['rp'].data, 'synthetic')

  def test_every_table_of_the_paper_has_a_valid_flagfile(self):
    names = {os.path.basename(f)[:-len('.flags')] for f in FLAGFILES}
    self.assertEqual(names, {'rp', 'col', 'ex', 'ms', 'rp_col', 'rp_ex', 'rp_ms',
                             'rp_col_ex', 'rp_col_ex_ms', 'rp_h', 'rp_col_h',
                             'rp_col_ex_ms_lasso', 'ti', 'rp_col_ti'})
    for path in FLAGFILES:
      config = parse(f'--flagfile={path}')
      self.assertEqual(config.trunk, 'resnet_v2_101', path)
      self.assertEqual(config.output_stride, 8, path)
      self.assertEqual(config.max_cost, configs.PAPER_TOTAL_GPU_HOURS, path)
      self.assertEqual(config.snapshot_cost, configs.PAPER_SNAPSHOT_GPU_HOURS)
      tasks = os.path.basename(path)[:-len('.flags')].replace('_lasso', '')
      tasks = tasks.replace('_h', '').split('_')
      self.assertEqual(sorted(config.tasks), sorted(tasks), path)
      if 'rp' in config.tasks:
        self.assertEqual(config.tasks['rp'].config.harmonize,
                         path.endswith('_h.flags'), path)
      self.assertEqual(config.lasso, path.endswith('_lasso.flags'), path)
      if 'col' in config.tasks:  # The paper's 35 M-parameter head.
        self.assertEqual(config.tasks['col'].config.head_widths, (4096, 4096))

  def test_per_task_and_tuple_flags(self):
    config = parse('--tasks=rp,col,ex', '--rp_batch_size=3',
                   '--col_head_widths=64,32', '--ex_learning_rate=0.01',
                   '--rp_harmonize', '--steps=7')
    self.assertEqual(config.tasks['rp'].config.batch_size, 3)
    self.assertEqual(config.tasks['col'].config.head_widths, (64, 32))
    self.assertEqual(config.tasks['ex'].learning_rate, 0.01)
    self.assertTrue(config.tasks['rp'].config.harmonize)
    self.assertEqual(config.steps, 7)

  def test_paper_preset_on_a_gpu_is_the_compiled_bf16_path(self):
    gpu = configs.paper_config(gpu=True)
    self.assertEqual((gpu.mixed_precision, gpu.xla, gpu.native_atrous),
                     ('bf16', True, False))
    self.assertEqual({n: r.config.batch_size for n, r in gpu.tasks.items()},
                     {'rp': 256, 'col': 64, 'ex': 64, 'ms': 16})
    self.assertEqual(
        {n for n, r in gpu.tasks.items()
         if getattr(r.config, 'device_preprocessing', False)},
        {'rp', 'col', 'ex'})
    cpu = configs.paper_config()
    self.assertEqual((cpu.mixed_precision, cpu.xla), ('none', False))
    self.assertEqual(configs.cpu_config(gpu=True), configs.cpu_config())
    # Flags still override the GPU defaults.
    with mock.patch.object(train, '_has_gpu', return_value=True):
      config = parse('--config=paper', '--tasks=rp,col',
                     '--mixed_precision=none', '--noxla',
                     '--col_batch_size=8')
      flagfile = parse(f'--flagfile={os.path.join(ROOT, "flags", "col.flags")}')
    self.assertEqual((config.mixed_precision, config.xla), ('none', False))
    self.assertEqual(config.tasks['col'].config.batch_size, 8)
    self.assertEqual(config.tasks['rp'].config.batch_size, 256)
    self.assertEqual((flagfile.mixed_precision, flagfile.xla), ('bf16', True))

  @parameterized.parameters(
      (('--tasks=rp,jigsaw',), "unknown task 'jigsaw'"),
      (('--rp_batch_size=-4',), 'batch_size must be positive, got -4'),
      (('--col_head_widths=64,wide',), '--col_head_widths: expected'),
      (('--tasks=col', '--rp_harmonize'), 'rp is not among --tasks'),
      (('--tasks=col', '--rp_batch_size=2'), 'rp is not among --tasks'),
      (('--output_stride=12',), 'output_stride'),
      (('--steps=0',), 'steps must be positive'),
      (('--config=paper', '--tasks=ms', '--cost_model=paper'),
       'set ms_step_cost'),
  )
  def test_invalid_values_name_the_problem(self, args, message):
    with self.assertRaisesRegex(configs.ConfigError, message):
      parse(*args)


def main_in_process(*args):
  """(exit status, stderr) of train.main with `args` as the command line."""
  stderr = io.StringIO()
  train.FLAGS.unparse_flags()
  try:
    train.FLAGS(['mtssl.train', *args])
    with contextlib.redirect_stderr(stderr):
      status = train.main(['mtssl.train'])
  finally:
    train.FLAGS.unparse_flags()
  return status, stderr.getvalue()


class CommandLineTest(tf.test.TestCase):

  def test_bad_input_exits_2_with_one_line(self):
    for args, message in (
        (('--rp_data=folder:/no/such/dir',), "rp_data='folder:/no/such/dir'"),
        (('--tasks=rp,jigsaw',), "unknown task 'jigsaw'"),
        (('--rp_batch_size=0',), 'batch_size must be positive'),
    ):
      status, stderr = main_in_process(
          *args, f'--model_dir={self.get_temp_dir()}/run')
      self.assertEqual(status, 2, (args, stderr[-2000:]))
      errors = [l for l in stderr.splitlines() if l.startswith('error:')]
      self.assertLen(errors, 1, stderr[-2000:])
      self.assertIn(message, errors[0])
      self.assertFalse(os.path.exists(f'{self.get_temp_dir()}/run/checkpoint'))

  def test_real_entry_point_rejects_an_unknown_flag(self):
    for args, message in ((('--no_such_flag=1',), 'no_such_flag'),):
      result = run_cli(*args, f'--model_dir={self.get_temp_dir()}/run')
      self.assertEqual(result.returncode, 2, (args, result.stderr[-2000:]))
      errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
      self.assertLen(errors, 1, result.stderr[-2000:])
      self.assertIn(message, errors[0])
      self.assertFalse(os.path.exists(f'{self.get_temp_dir()}/run/checkpoint'))


SMALL_RP = ('--tasks=rp', '--trunk=resnet_v2_tiny', '--rp_batch_size=2',
            '--rp_patch_size=32', '--rp_gap=16', '--rp_jitter=3',
            '--rp_min_pixels=20000', '--rp_max_pixels=30000',
            '--rp_unit_depths=32,16', '--rp_unit_bottleneck=8',
            '--rp_fc_bottleneck=16', '--log_every=1')


def one_error(test, status, stderr, message):
  test.assertEqual(status, 2, stderr[-3000:])
  errors = [l for l in stderr.splitlines() if l.startswith('error:')]
  test.assertLen(errors, 1, stderr[-3000:])
  test.assertIn(message, errors[0])
  test.assertNotIn('Traceback', stderr)


class FaultsTest(tf.test.TestCase):

  def test_every_task_flag_has_a_help_text(self):
    for task in tasks_lib.task_names():
      cls = tasks_lib.get_task_class(task).config_class
      for f, _ in config_base.config_fields(cls):
        self.assertTrue(f.metadata.get('help'), f'{task}: {f.name}')
        help_text = train.FLAGS[f'{task}_{f.name}'].help
        self.assertNotIn(f'{task}: {f.name} (default', help_text)

  def test_setup_errors_exit_2_with_one_line(self):
    tmp = self.get_temp_dir()
    a_file = os.path.join(tmp, 'a_file')
    with open(a_file, 'w') as f:
      f.write('x')
    garbage = os.path.join(tmp, 'garbage.npy')
    with open(garbage, 'wb') as f:
      f.write(b'\x93NUMPY not really')
    for args, message in (
        (('--rp_learning_rate=nan',), '--rp_learning_rate must be a finite'),
        (('--max_cost=inf',), '--max_cost must be a finite'),
        ((f'--model_dir={a_file}',), 'is a file, not a directory'),
        ((f'--model_dir={a_file}/run',), 'cannot be written'),
        ((f'--col_prior_path={garbage}',), f"col: Colour prior '{garbage}'"),
        ((*SMALL_RP, '--steps=1', f'--model_dir={tmp}/init',
          '--init_checkpoint=/no/such/ckpt'),
         "init_checkpoint '/no/such/ckpt' does not exist"),
    ):
      if not any(a.startswith('--model_dir') for a in args):
        args = (*args, f'--model_dir={tmp}/run')
      status, stderr = main_in_process(*args)
      one_error(self, status, stderr, message)

  def test_resume_with_another_trunk_exits_2_quietly_without_hanging(self):
    model_dir = os.path.join(self.get_temp_dir(), 'run')
    status, stderr = main_in_process(*SMALL_RP, '--steps=1',
                                     f'--model_dir={model_dir}')
    self.assertEqual(status, 0, stderr[-3000:])
    # A real process: live input iterators used to hang its exit.
    env = dict(os.environ)
    env.pop('TF_CPP_MIN_LOG_LEVEL', None)
    result = subprocess.run(
        [sys.executable, '-m', 'mtssl.train', *SMALL_RP, '--steps=2',
         '--trunk=resnet_v2_small', f'--model_dir={model_dir}'],
        capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    one_error(self, result.returncode, result.stderr, 'does not fit this model')
    self.assertNotIn('Value in checkpoint could not be found', result.stderr)
    self.assertNotIn('cuInit', result.stderr)


if __name__ == '__main__':
  tf.test.main()
