"""The benchmark runs end to end on tiny settings and writes valid reports.

Nothing here checks a timing: the figures are measurements, and they live in
benchmarks/results/. What is checked is that every row is complete and
consistent (FLOPs from the model's graph, utilization arithmetic, the
pipeline's reference comparison) and that bad settings are refused by name.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import tensorflow as tf
from absl import flags

from mtssl import benchmark
from mtssl.benchmarking import accounting
from mtssl.benchmarking import environment
from mtssl.benchmarking import pipelines
from mtssl.benchmarking import report as report_lib
from mtssl.benchmarking import settings as settings_lib
from mtssl.benchmarking import steps as steps_lib
from mtssl.configs import benchmark as benchmark_configs
from mtssl.configs import training as configs


def tiny_settings(tasks):
  return settings_lib.settings_from_preset(
      'cpu', tasks, trunk='resnet_v2_tiny', batch_sizes={t: 2 for t in tasks})


class StepBenchmarkTest(tf.test.TestCase):

  def test_rows_for_every_task_and_the_multi_task_cycle(self):
    settings = tiny_settings(['rp', 'col'])
    rows = steps_lib.benchmark_steps(settings, ['fp32'], [False], steps=1,
                                     warmup_steps=1, peak=1.0, log=lambda _: 0)
    by_task = {r['task']: r for r in rows}
    self.assertEqual(set(by_task), {'rp', 'col', 'multi'})
    for name in ('rp', 'col'):
      row = by_task[name]
      self.assertNotIn('error', row)
      self.assertTrue(row['finite'])
      self.assertGreater(row['step_s'], 0)
      # rp sends a pair of patches through the trunk per example.
      self.assertEqual(row['trunk_images_per_example'],
                       2 if name == 'rp' else 1)
      self.assertAllClose(row['forward_gmacs'],
                          row['trunk_gmacs'] + row['head_gmacs'], rtol=1e-6)
      self.assertAllClose(row['train_gflop_per_example'],
                          6 * row['forward_gmacs'], rtol=1e-3)
      self.assertAllClose(row['examples_per_s'],
                          row['batch_size'] / row['step_s'], rtol=1e-3)
      # MFU against a peak of 1 TFLOP/s is the achieved TFLOP/s.
      self.assertAllClose(row['mfu'], row['achieved_tflops'], atol=1e-4)
    self.assertEqual(by_task['multi']['batch_size'], 4)

  def test_native_atrous_without_xla_on_cpu_is_reported_not_run(self):
    if tf.config.list_physical_devices('GPU'):
      self.skipTest('a GPU runs native atrous convolutions without XLA')
    rows = steps_lib.benchmark_steps(tiny_settings(['col']), ['fp32'], [False],
                                     native_atrous_values=[True], steps=1,
                                     warmup_steps=1, log=lambda _: 0)
    self.assertLen(rows, 1)
    self.assertIn('no gradient kernel on CPU', rows[0]['error'])

  def test_spec_figures_for_the_paper_model(self):
    # The reference count of the paper's col model: trunk 28.75 + head 35.7 G.
    config = configs.paper_config(['col']).tasks['col'].config
    counted = {'trunk_image_size': [256, 256], 'trunk_images_per_example': 1}
    spec = accounting.paper_model_gmacs('col', 'resnet_v2_101', 8, config,
                                        counted)
    self.assertAllClose(spec['forward_gmacs'], 28.75 + 35.7)
    self.assertIsNone(accounting.paper_model_gmacs(
        'col', 'resnet_v2_small', 8, config, counted))

  def test_target_rate_is_the_inverse_of_utilization(self):
    rates = accounting.target_rates({'col': 64.45}, 0.35, 989.4)
    row = {'train_gflop_per_example': 64.45 * 6,
           'examples_per_s': rates['col']}
    accounting.utilization(row, 989.4)
    self.assertAllClose(row['mfu'], 0.35, atol=1e-4)

  def test_peak_table(self):
    # First match wins: the H100 PCIe before the SXM H100; the H200 is known.
    self.assertEqual(environment.peak_tflops('NVIDIA H100 PCIe', 'bf16'), 756.0)
    self.assertEqual(environment.peak_tflops('NVIDIA H200', 'bf16'), 989.4)
    self.assertEqual(environment.peak_tflops('NVIDIA H200', 'fp32', tf32=True),
                     494.7)
    self.assertEqual(environment.peak_tflops('NVIDIA H200', 'fp32', tf32=False),
                     66.9)
    self.assertIsNone(environment.peak_tflops('CPU: AMD EPYC', 'bf16'))

  def test_step_table_rows_match_its_header(self):
    base = {'kind': 'step', 'trunk': 't', 'precision': 'bf16', 'xla': True,
            'native_atrous': False}
    done = dict(base, task='col', batch_size=2, step_s=0.5, step_s_min=0.4,
                examples_per_s=4.0, forward_gmacs=64.42,
                paper_model={'forward_gmacs': 64.45},
                train_gflop_per_example=386.5, achieved_tflops=1.5, mfu=0.2,
                peak_memory_mib=None, compile_s=3.0)
    failed = dict(base, task='rp', error='OOM')
    text = report_lib.markdown({'environment': environment.environment(),
                                'command': 'test', 'results': [done, failed]})
    table = [l for l in text.splitlines() if l.startswith('|')]
    self.assertLen(table, 4)
    self.assertEqual({l.count('|') for l in table}, {table[0].count('|')})
    self.assertIn('| 64.42 [64.45] |', table[2])
    self.assertIn('| 20.0% | - |', table[2])

  def test_bad_settings_name_the_problem(self):
    with self.assertRaisesRegex(settings_lib.BenchmarkError, 'unknown trunk'):
      settings_lib.settings_from_preset('cpu', ['col'], trunk='resnet_v9')
    with self.assertRaisesRegex(settings_lib.BenchmarkError, 'no setting'):
      settings_lib.settings_from_preset('cpu', ['col'],
                                     task_overrides={'col': {'bogus': 1}})
    with self.assertRaisesRegex(settings_lib.BenchmarkError, 'not run'):
      settings_lib.settings_from_preset('cpu', ['col'],
                                     task_overrides={'ms': {'batch_size': 1}})
    with self.assertRaisesRegex(benchmark_configs.ConfigError,
                                'must be positive'):
      benchmark_configs.parse_batch_sizes(['col:0'], ['col'])
    with self.assertRaisesRegex(benchmark_configs.ConfigError,
                                "--xla: 'maybe'"):
      benchmark_configs.parse_bools(['maybe'], 'xla')


class PipelineBenchmarkTest(tf.test.TestCase):

  def test_rows_and_report(self):
    settings = tiny_settings(['col', 'ms'])
    rows = pipelines.benchmark_pipelines(
        settings.task_configs, batch_size=2, batches=1, warmup_batches=1,
        num_images=2, image_size=(64, 80), encodings=('memory', 'jpeg'),
        reference_examples=2, variants=('fast', 'plain', 'device'),
        target_rates={'col': 100.0}, log=lambda _: 0)
    keys = {(r['task'], r['variant'], r['input']) for r in rows}
    # ms has no fast/plain/device variants.
    self.assertEqual(keys, {('col', 'fast', 'memory'), ('col', 'fast', 'jpeg'),
                            ('col', 'plain', 'memory'),
                            ('col', 'plain', 'jpeg'), ('col', 'device', 'memory'),
                            ('col', 'device', 'jpeg'), ('ms', '-', 'memory'),
                            ('ms', '-', 'jpeg')})
    for row in rows:
      self.assertGreater(row['per_core_examples_per_s'], 0)
      self.assertGreater(row['total_examples_per_s'], 0)
      if row['input'] == 'memory':
        self.assertGreater(row['reference']['examples_per_cpu_s'], 0)
        self.assertAllClose(
            row['speedup_vs_reference'],
            row['per_core_examples_per_cpu_s'] /
            row['reference']['examples_per_cpu_s'], rtol=0.02)
    col_row = [r for r in rows if r['task'] == 'col'][0]
    self.assertAllClose(col_row['cores_for_target'],
                        100.0 / col_row['per_core_examples_per_cpu_s'],
                        rtol=0.05, atol=0.06)

    report = {'environment': environment.environment(), 'command': 'test',
              'results': rows, 'target': 'test'}
    out = tempfile.mkdtemp(dir=self.get_temp_dir())
    paths = report_lib.write_report(report, out, 'tiny')
    with open(paths['json']) as f:
      self.assertEqual(len(json.load(f)['results']), len(rows))
    with open(paths['markdown']) as f:
      text = f.read()
    self.assertIn('## Input pipelines', text)
    table = [l for l in text.splitlines() if l.startswith('| col') or
             l.startswith('| ms')]
    self.assertLen(table, len(rows))
    self.assertEqual(sorted(os.listdir(out)), ['tiny.json', 'tiny.md'])


def _run_main(argv):
  """(status, stderr) of mtssl.benchmark.main in this process."""
  fv = flags.FlagValues()
  benchmark_configs.define_flags(fv)
  fv(['mtssl.benchmark'] + argv)
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    status = benchmark.main(['mtssl.benchmark'], fv)
  return status, err.getvalue()


class CommandLineTest(tf.test.TestCase):

  def test_tiny_run_writes_the_report_with_its_command(self):
    out = tempfile.mkdtemp(dir=self.get_temp_dir())
    status, err = _run_main([
        '--what=steps', '--config=cpu', '--tasks=col',
        '--trunk=resnet_v2_tiny', '--batch_size=2', '--precisions=fp32',
        '--xla=false', '--warmup_steps=1', '--steps=1', '--windows=2',
        f'--output_dir={out}', '--name=tiny'])
    self.assertEqual(status, 0, err)
    with open(os.path.join(out, 'tiny.json')) as f:
      report = json.load(f)
    self.assertIn('--trunk=resnet_v2_tiny', report['command'])
    (row,) = report['results']
    self.assertEqual((row['task'], row['batch_size'], row['windows']),
                     ('col', 2, 2))
    self.assertLessEqual(row['step_s_min'], row['step_s'])
    if not tf.config.list_physical_devices('GPU'):
      self.assertIsNone(row['peak_memory_mib'])
    with open(os.path.join(out, 'tiny.md')) as f:
      self.assertIn('peak memory MiB', f.read())

  def test_bad_flags_exit_2_with_the_flag_named(self):
    for argv, message in (
        (['--task_overrides={not json'], 'not JSON'),
        (['--task_overrides=[1]'], 'must be a JSON object'),
        (['--what=everything'], "--what: unknown part 'everything'"),
        (['--xla=maybe'], "--xla: 'maybe'"),
        (['--batch_size=ex:4'], "--batch_size: 'ex' is not among"),
        (['--pipeline_image_size=375', '--what=pipelines'],
         '--pipeline_image_size must be two'),
        (['--trunk=resnet_v9'], "unknown trunk 'resnet_v9'"),
        (['--tasks=col,bogus'], "--tasks: unknown task 'bogus'"),
    ):
      with self.subTest(argv=argv):
        status, err = _run_main(['--config=cpu', '--tasks=col', *argv])
        self.assertEqual(status, 2, err)
        self.assertIn(message, err)
        self.assertEqual(err.count('\n'), 1, err)

  def test_entry_point_refuses_a_bad_precision(self):
    result = subprocess.run(
        [sys.executable, '-m', 'mtssl.benchmark', '--config=cpu',
         '--tasks=col', '--precisions=fp8',
         f'--output_dir={tempfile.mkdtemp(dir=self.get_temp_dir())}'],
        capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertIn("--precisions: unknown precision 'fp8'", result.stderr)


if __name__ == '__main__':
  tf.test.main()
