"""`python -m mtssl.evaluate`: flags generated per protocol, a run's outputs,
and bad input -> one line and exit 2 (in process; two runs of the real
entry point)."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys

from absl import flags
import tensorflow as tf

from mtssl import evaluate
from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from mtssl.configs import base
from mtssl.configs import evaluation as evaluation_config
from mtssl.evaluation import factory
from mtssl.evaluation import linear
from mtssl.evaluation import registry
from tests import eval_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LINEAR = ['--trunk=resnet_v2_tiny', '--image_size=32', '--resize_size=32',
               '--batch_size=4', '--eval_batch_size=20',
               '--synthetic_train_examples=16', '--synthetic_eval_examples=20']


def evaluate_subprocess(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'mtssl.evaluate', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


def evaluate_in_process(*args):
  """(exit status, stdout, stderr) of the command line, on fresh flags."""
  flag_values = flags.FlagValues()
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      argv = evaluate.parse_flags(['evaluate', *args], flag_values)
      status = evaluate.main(argv, flag_values)
    except SystemExit as e:
      status = e.code
  return status, out.getvalue(), err.getvalue()


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith('error: ')]


class FlagsTest(tf.test.TestCase):

  def test_flags_come_from_the_protocols_tree_with_its_defaults(self):
    for protocol in registry.protocol_names():
      flag_values = flags.FlagValues()
      evaluation_config.define_flags(protocol, flag_values)
      default = evaluation_config.default_config(protocol)
      for group in evaluation_config.GROUPS:
        sub = getattr(default, group)
        for field in type(sub).__dataclass_fields__.values():
          if field.name not in flag_values:
            continue
          self.assertIn('(default: ', flag_values[field.name].help)
      # Each protocol's paper-scale run shows in its help.
      self.assertIn(f'(default: {default.run.train_steps})',
                    flag_values['train_steps'].help)
    linear = flags.FlagValues()
    evaluation_config.define_flags('linear', linear)
    self.assertIn('(default: 150000)', linear['train_steps'].help)
    self.assertIn('(default: 8)', linear['output_stride'].help)
    self.assertNotIn('short_side', linear)  # detection's own

  def test_given_flags_fill_the_tree(self):
    flag_values = flags.FlagValues()
    evaluation_config.define_flags('depth', flag_values)
    flag_values(['evaluate', '--model_dir=/tmp/d', '--train_steps=7',
                 '--image_size=32', '--upproj_filters=8,4,2',
                 '--batch_norm=frozen', '--trunk=resnet_v2_tiny',
                 '--synthetic_size=40,48', '--name=Row'])
    config = evaluation_config.from_flags('depth', flag_values)
    self.assertEqual(config.run.train_steps, 7)
    self.assertEqual(config.run.name, 'Row')
    self.assertEqual(config.run.optimizer, 'rmsprop')  # depth's default
    self.assertEqual(config.trunk.trunk, 'resnet_v2_tiny')
    self.assertEqual(config.trunk.output_stride, 16)
    self.assertEqual(config.inputs.synthetic_size, (40, 48))
    self.assertEqual(config.protocol_config.image_size, (32, 32))
    self.assertEqual(config.protocol_config.upproj_filters, (8, 4, 2))
    self.assertFalse(config.protocol_config.train_batch_norm)
    self.assertEqual(
        evaluation_config.make_config('depth', model_dir='/tmp/d',
                                      train_steps=7, image_size=(32,),
                                      upproj_filters=(8, 4, 2),
                                      batch_norm='frozen',
                                      trunk='resnet_v2_tiny',
                                      synthetic_size=(40, 48), name='Row'),
        config)
    with self.assertRaisesRegex(evaluation_config.ConfigError,
                                "depth: no setting 'short_side'"):
      evaluation_config.make_config('depth', short_side=3)


  def test_a_registered_protocol_gets_flags_and_a_factory(self):
    @dataclasses.dataclass
    class CoarseConfig(linear.LinearConfig):
      pool_size: int = base.field(1, 'adaptive max pool bins a side')

    @registry.register_protocol('coarse_linear')
    class CoarseProtocol(linear.LinearProtocol):
      config_class = CoarseConfig
      run_defaults = dict(train_steps=5)

    self.addCleanup(registry._PROTOCOLS.pop, 'coarse_linear')  # pylint: disable=protected-access
    self.assertIn('coarse_linear', registry.protocol_names())
    flag_values = flags.FlagValues()
    evaluation_config.define_flags('coarse_linear', flag_values)
    self.assertIn('(default: 1)', flag_values['pool_size'].help)
    flag_values(['evaluate', '--model_dir=/tmp/c', '--image_size=32',
                 '--resize_size=40', '--trunk=resnet_v2_tiny'])
    evaluation = factory.make_evaluation(
        evaluation_config.from_flags('coarse_linear', flag_values))
    self.assertIs(evaluation.protocol_class, CoarseProtocol)
    self.assertEqual(evaluation.run_config.train_steps, 5)
    self.assertEqual(evaluation.protocol_config.pool_size, 1)
    self.assertEqual(evaluation.train_source.kind, 'classification')
    with self.assertRaisesRegex(ValueError, "'linear' is already registered"):
      registry.register_protocol('linear')(CoarseProtocol)


class CliTest(tf.test.TestCase):

  def test_run_prints_the_table_row_and_writes_outputs(self):
    # The real entry point, in a process of its own.
    model_dir = self.get_temp_dir() + '/run'
    result = evaluate_subprocess('linear', f'--model_dir={model_dir}',
                                 '--train_steps=3', '--name=Tiny',
                                 *TINY_LINEAR)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    self.assertIn('| Pre-training | ImageNet top1 | ImageNet top5 |', lines)
    with open(os.path.join(model_dir, 'linear_metrics.json')) as f:
      report = json.load(f)
    self.assertIn(report['table_row'], lines)
    self.assertTrue(report['table_row'].startswith('| Tiny | '))
    self.assertEqual(report['steps'], 3)
    self.assertEqual(report['run_config']['train_steps'], 3)
    self.assertTrue(os.listdir(os.path.join(model_dir, 'eval')))

  def test_unknown_protocol_exits_2_from_the_entry_point(self):
    result = evaluate_subprocess('classify', '--model_dir=/tmp/x')
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertEqual(len(error_lines(result.stderr)), 1, result.stderr)
    self.assertStartsWith(
        error_lines(result.stderr)[0],
        'error: give exactly one protocol (linear, depth, detection); got '
        'classify.')

  def test_bad_flags_exit_2_with_one_clear_line(self):
    for args, message in [
        (['linear', '--model_dir=/tmp/x', '--train_steps=abc'],
         'error: flag --train_steps=abc: invalid literal for int()'),
        ([], 'error: give exactly one protocol (linear, depth, detection); '
         'got nothing.'),
        (['--model_dir=/tmp/x'], 'error: give exactly one protocol'),
        (['linear', 'depth'], 'error: give exactly one protocol (linear, '
         'depth, detection); got linear depth.'),
        # A flag of another protocol is not one of this protocol's.
        (['depth', '--model_dir=/tmp/x', '--short_side=5'],
         "error: Unknown command line flag 'short_side'"),
        (['linear', '--model_dir=/tmp/x', '--optimizer=sgd'],
         'error: flag --optimizer=sgd: value should be one of'),
        (['depth', '--model_dir=/tmp/x', '--image_size=1,2,3'],
         'error: image_size: give S or H,W, got 1,2,3.'),
        (['detection', '--model_dir=/tmp/x', '--anchor_sizes=16,big'],
         "error: --anchor_sizes: expected comma-separated float values, got "
         "'16,big'."),
        (['linear', '--train_steps=3'], 'error: --model_dir is required'),
        (['linear', '--model_dir=/tmp/x', '--trunk=resnet_v2_7'],
         "error: Unknown trunk 'resnet_v2_7'"),
        (['detection', '--model_dir=/tmp/x', '--crop_size=7'],
         'error: crop_size must be even and >= 2'),
    ]:
      status, _, stderr = evaluate_in_process(*args)
      self.assertEqual(status, 2, (args, stderr))
      self.assertLen(error_lines(stderr), 1, (args, stderr))
      self.assertStartsWith(error_lines(stderr)[0], message)

  def test_missing_split_and_wrong_architecture_exit_2(self):
    data_dir = eval_fixtures.prepare_tiny_tfds(self.get_temp_dir() + '/tfds')
    status, _, stderr = evaluate_in_process(
        'linear', f'--model_dir={self.get_temp_dir()}/a',
        f'--data=tfds:{eval_fixtures.TINY_TFDS_NAME}',
        f'--eval_data=tfds:{eval_fixtures.TINY_TFDS_NAME}:validation',
        f'--tfds_data_dir={data_dir}', *TINY_LINEAR)
    self.assertEqual(status, 2, stderr)
    self.assertEqual(error_lines(stderr), [
        f"error: TFDS dataset '{eval_fixtures.TINY_TFDS_NAME}' has no split "
        f"'validation'; it has ['test', 'train']."])

    tiny = resnet_lib.trunk_from_name('resnet_v2_tiny').build_for_input()
    checkpoint = slim_checkpoint.write_trunk_checkpoint(
        tiny, self.get_temp_dir() + '/tiny_ckpt', overwrite=True)
    status, _, stderr = evaluate_in_process(
        'depth', f'--model_dir={self.get_temp_dir()}/b',
        '--trunk=resnet_v2_small', f'--init_checkpoint={checkpoint}',
        '--image_size=32', '--upproj_filters=8,8,8', '--train_steps=1')
    self.assertEqual(status, 2, stderr)
    self.assertLen(error_lines(stderr), 1)
    self.assertIn('holds a trunk of 5 bottleneck units, but trunk '
                  'resnet_v2_small has 8', error_lines(stderr)[0])


if __name__ == '__main__':
  tf.test.main()
