"""Benchmark reports: the JSON record and its markdown tables."""

import os
from typing import Dict, Mapping

from mtssl.utils import io_utils


def fmt(value, digits=3):
  """Numbers with `digits` significant digits (all digits of integer parts)."""
  if value is None:
    return '-'
  if isinstance(value, float):
    if value == 0 or abs(value) >= 10 ** (digits - 1):
      return f'{value:.0f}'
    return f'{value:.{digits}g}'
  return str(value)


def _on_off(value):
  return 'on' if value else 'off'


def _atrous(row):
  return 'native' if row['native_atrous'] else 's2b'


STEP_HEADER = ('| task | trunk | batch | precision | XLA | atrous | step s | '
               'fastest window s | examples/s | fwd GMAC/ex [paper] | '
               'train GFLOP/ex | TFLOP/s | MFU | peak memory MiB | '
               'first step s |')


def _step_lines(steps):
  columns = STEP_HEADER.count('|') - 1
  lines = ['## Training steps', '',
           'Forward G MACs per example counted from the model\'s graph (the '
           'paper model\'s reference count in brackets where the model is the '
           'paper\'s); training FLOPs = 6 x forward MACs. Constant '
           'device-resident batches; input not included. Step time: the '
           'median over the timed windows of the mean step time. Peak '
           'memory: the GPU\'s peak allocation during the task\'s steps (- on '
           'a CPU).', '', STEP_HEADER, '|' + '---|' * columns]
  for r in steps:
    head = (f'| {r["task"]} | {r["trunk"]} | {r.get("batch_size", "-")} | '
            f'{r["precision"]} | {_on_off(r["xla"])} | {_atrous(r)} | ')
    if 'error' in r:
      lines.append(head + f'failed: {r["error"]} |' + '|' * (columns - 7))
      continue
    spec = r.get('paper_model', {}).get('forward_gmacs')
    gmacs = fmt(r['forward_gmacs'], 4) + (f' [{spec:.4g}]' if spec else '')
    mfu = f'{100 * r["mfu"]:.1f}%' if r.get('mfu') is not None else '-'
    lines.append(
        head + f'{fmt(r["step_s"])} | {fmt(r.get("step_s_min"))} | '
        f'{fmt(r["examples_per_s"])} | {gmacs} | '
        f'{fmt(r["train_gflop_per_example"])} | '
        f'{fmt(r["achieved_tflops"])} | {mfu} | '
        f'{fmt(r.get("peak_memory_mib"), 4)} | {fmt(r.get("compile_s"))} |')
  lines.append('')
  return lines


def _pipeline_lines(pipes, target):
  lines = ['## Input pipelines', '',
           'Examples/s of each task\'s tf.data pipeline on images held in '
           'memory (`memory`: decoded; `jpeg`: decoded in the pipeline), on '
           'one thread and on all cores, per second of wall time and of '
           'process CPU time. Reference: the same preprocessing per image in '
           'NumPy/OpenCV on one thread '
           '(mtssl/benchmarking/reference_pipelines.py); speed-up: 1-thread '
           'examples per CPU-second over the reference\'s. Variant `plain`: '
           'the task\'s fast_preprocessing off; `device`: its '
           'device_preprocessing on (the host\'s share; the reference '
           'is the whole host path). Cores for target: CPU cores '
           f'the pipeline needs for the training rate of {target}.', '',
           '| task | variant | input | batch | 1 thread ex/s | ex/CPU-s | '
           'all cores ex/s | reference ex/CPU-s | speed-up | '
           'target ex/s | cores for target |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in pipes:
    ref = r.get('reference', {}).get('examples_per_cpu_s')
    lines.append(
        f'| {r["task"]} | {r["variant"]} | {r["input"]} | {r["batch_size"]} | '
        f'{fmt(r["per_core_examples_per_s"])} | '
        f'{fmt(r["per_core_examples_per_cpu_s"])} | '
        f'{fmt(r["total_examples_per_s"])} ({r["threads_total"]}) | '
        f'{fmt(ref)} | {fmt(r.get("speedup_vs_reference"))} | '
        f'{fmt(r.get("target_examples_per_s"))} | '
        f'{fmt(r.get("cores_for_target"))} |')
  lines.append('')
  return lines


def markdown(report: Mapping[str, object]) -> str:
  """The report as markdown: environment, steps table, pipelines table."""
  env = report['environment']
  lines = [f'# mtssl benchmark: {env["device"]}', '',
           f'- date: {env["date"]}',
           f'- device: {env["device"]}; CPU {env["cpu"]}, {env["cpu_cores"]} '
           f'cores, {env["memory_gib"]} GiB',
           f'- versions: Python {env["python"]}, TensorFlow '
           f'{env["tensorflow"]}, tf_keras {env["tf_keras"]}, NumPy '
           f'{env["numpy"]}, OpenCV {env["opencv"]}',
           f'- load average before / after: {env["load_average"]} / '
           f'{report.get("load_average_after")}',
           f'- command: `{report["command"]}`', '']
  steps = [r for r in report['results'] if r['kind'] == 'step']
  if steps:
    lines += _step_lines(steps)
  pipes = [r for r in report['results'] if r['kind'] == 'pipeline']
  if pipes:
    lines += _pipeline_lines(pipes, report.get('target', '-'))
  return '\n'.join(lines)


def write_report(report: Mapping[str, object], output_dir: str,
                 name: str) -> Dict[str, str]:
  """Writes `<output_dir>/<name>.json` and `.md` atomically; their paths."""
  paths = {'json': os.path.join(output_dir, f'{name}.json'),
           'markdown': os.path.join(output_dir, f'{name}.md')}
  io_utils.atomic_write_json(paths['json'], report)
  io_utils.atomic_write_text(paths['markdown'], markdown(report))
  return paths
