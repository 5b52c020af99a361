"""`python -m mtssl.evaluate`: a run's outputs, and bad input -> exit 2."""

import json
import os
import subprocess
import sys

import tensorflow as tf

from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from tests import eval_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LINEAR = ['--trunk=resnet_v2_tiny', '--image_size=32', '--resize_size=32',
               '--batch_size=4', '--eval_batch_size=20',
               '--synthetic_train_examples=16', '--synthetic_eval_examples=20']


def evaluate(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'mtssl.evaluate', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


def error_lines(result):
  return [l for l in result.stderr.splitlines() if l.startswith('error: ')]


class CliTest(tf.test.TestCase):

  def test_run_prints_the_table_row_and_writes_outputs(self):
    model_dir = self.get_temp_dir() + '/run'
    result = evaluate('linear', f'--model_dir={model_dir}', '--train_steps=3',
                      '--name=Tiny', *TINY_LINEAR)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    self.assertIn('| Pre-training | ImageNet top1 | ImageNet top5 |', lines)
    with open(os.path.join(model_dir, 'linear_metrics.json')) as f:
      report = json.load(f)
    self.assertIn(report['table_row'], lines)
    self.assertTrue(report['table_row'].startswith('| Tiny | '))
    self.assertEqual(report['steps'], 3)
    self.assertTrue(os.listdir(os.path.join(model_dir, 'eval')))

  def test_bad_flags_exit_2_with_one_clear_line(self):
    for args, message in [
        (['linear', '--model_dir=/tmp/x', '--train_steps=abc'],
         "error: flag --train_steps=abc: invalid literal for int()"),
        (['classify', '--model_dir=/tmp/x'],
         'error: give exactly one protocol (linear, depth, detection); got '
         'classify.'),
    ]:
      result = evaluate(*args)
      self.assertEqual(result.returncode, 2, result.stderr[-2000:])
      self.assertLen(error_lines(result), 1)
      self.assertStartsWith(error_lines(result)[0], message)

  def test_missing_split_and_wrong_architecture_exit_2(self):
    data_dir = eval_fixtures.prepare_tiny_tfds(self.get_temp_dir() + '/tfds')
    result = evaluate(
        'linear', f'--model_dir={self.get_temp_dir()}/a',
        f'--data=tfds:{eval_fixtures.TINY_TFDS_NAME}',
        f'--eval_data=tfds:{eval_fixtures.TINY_TFDS_NAME}:validation',
        f'--tfds_data_dir={data_dir}', *TINY_LINEAR)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertEqual(error_lines(result), [
        f"error: TFDS dataset '{eval_fixtures.TINY_TFDS_NAME}' has no split "
        f"'validation'; it has ['test', 'train']."])

    tiny = resnet_lib.trunk_from_name('resnet_v2_tiny').build_for_input()
    checkpoint = slim_checkpoint.write_trunk_checkpoint(
        tiny, self.get_temp_dir() + '/tiny_ckpt', overwrite=True)
    result = evaluate('depth', f'--model_dir={self.get_temp_dir()}/b',
                      '--trunk=resnet_v2_small',
                      f'--init_checkpoint={checkpoint}', '--image_size=32',
                      '--upproj_filters=8,8,8', '--train_steps=1')
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertLen(error_lines(result), 1)
    self.assertIn('holds a trunk of 5 bottleneck units, but trunk '
                  'resnet_v2_small has 8', error_lines(result)[0])


if __name__ == '__main__':
  tf.test.main()
