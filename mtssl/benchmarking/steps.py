"""Step benchmark: every task's training step, built as the trainer builds it,
timed on one constant device-resident batch."""

import dataclasses
import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import tensorflow as tf
import tf_keras

from mtssl.benchmarking import accounting
from mtssl.benchmarking import environment
from mtssl.benchmarking.settings import BenchmarkError
from mtssl.benchmarking.settings import ModelSettings
from mtssl.benchmarking.settings import first_batches
from mtssl.benchmarking.settings import make_task
from mtssl.training import core
from mtssl.training import step as step_lib

# --precisions value -> the trainer's --mixed_precision value.
POLICIES = {'fp32': 'none', 'bf16': 'bf16', 'fp16': 'fp16'}


def mixed_precision_policy(precision: str):
  if precision not in POLICIES:
    raise BenchmarkError(f'--precisions: unknown precision {precision!r}; '
                         f'choose from {", ".join(POLICIES)}.')
  return core.precision_policy(POLICIES[precision])


def build_steps(settings: ModelSettings, precision: str, xla: bool,
                native_atrous: bool, batches, learning_rate: float = 1e-4):
  """(model, {task: TaskTrainStep}, {task: device-resident batch})."""
  with mixed_precision_policy(precision):
    task_objects = {n: make_task(n, c) for n, c in settings.task_configs.items()}
    model = core.build_model(settings.trunk, settings.output_stride,
                             task_objects, native_atrous=native_atrous,
                             seed=settings.seed)
    with tf.device(environment.compute_device()):
      resident = {n: tf.nest.map_structure(tf.identity, b)
                  for n, b in batches.items()}
    model.build_all({n: f for n, (f, _) in resident.items()})
    steps = {n: step_lib.TaskTrainStep(
        model, n, core.task_optimizer(n, learning_rate, POLICIES[precision]),
        jit_compile=xla)
             for n in settings.task_names}
  return model, steps, resident


@dataclasses.dataclass
class StepTiming:
  compile_s: float  # The first call: tracing, compilation and one step.
  step_s: float  # Median over the windows of the mean step time.
  step_s_min: float  # The fastest window's mean step time.
  output: Dict[str, tf.Tensor]


def time_steps(run_once: Callable[[], Dict[str, tf.Tensor]], warmup: int,
               steps: int, windows: int = 3) -> StepTiming:
  """Times `windows` windows of `steps` calls after `warmup` calls (the first
  one timed on its own); every window ends with a read of the loss, which
  waits for the device."""
  start = time.perf_counter()
  out = run_once()
  float(out['loss'])
  compile_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    out = run_once()
  float(out['loss'])
  means = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      out = run_once()
    float(out['loss'])  # Waits for the device.
    means.append((time.perf_counter() - start) / steps)
  return StepTiming(compile_s, statistics.median(means), min(means), out)


def error_text(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'[:300]


def _timed(row, timing: StepTiming, examples: int, steps: int, windows: int):
  row.update(step_s=round(timing.step_s, 5),
             step_s_min=round(timing.step_s_min, 5), steps=steps,
             windows=windows,
             examples_per_s=round(examples / timing.step_s, 3),
             peak_memory_mib=environment.peak_memory_mib())


def benchmark_steps(settings: ModelSettings, precisions: Sequence[str],
                    xla_values: Sequence[bool],
                    native_atrous_values: Sequence[bool] = (False,),
                    warmup_steps: int = 2, steps: int = 10,
                    multi_task: bool = True,
                    peak: Optional[float] = None, windows: int = 3,
                    log=print) -> List[Dict[str, object]]:
  """Rows of step measurements, one per task (and `multi`) and combination."""
  if warmup_steps < 1 or steps < 1 or windows < 1:
    raise BenchmarkError('warmup_steps, steps and windows must be at least 1.')
  task_objects = {n: make_task(n, c) for n, c in settings.task_configs.items()}
  batches = first_batches(task_objects, settings.data, settings.seed)
  counts = {}
  rows = []
  for precision in precisions:
    for xla in xla_values:
      for native in native_atrous_values:
        base = {'kind': 'step', 'trunk': settings.trunk,
                'output_stride': settings.output_stride,
                'precision': precision, 'xla': bool(xla),
                'native_atrous': bool(native)}
        if native and not xla and not environment.has_gpu():
          for name in settings.task_names:
            rows.append(dict(base, task=name, error=(
                'native atrous convolutions have no gradient kernel on CPU '
                'without XLA')))
          continue
        try:
          model, train_steps, resident = build_steps(
              settings, precision, xla, native, batches)
        except Exception as e:  # pylint: disable=broad-except
          rows.append(dict(base, task='all', error=error_text(e)))
          log(f'build failed ({precision}, xla={xla}): {error_text(e)}')
          continue
        for name in settings.task_names:
          if name not in counts:
            counts[name] = accounting.forward_macs(model, name,
                                                   resident[name][0])
        results = {}
        for name in settings.task_names:
          row = dict(base, task=name)
          examples = int(model.tasks[name].examples_in(resident[name][0]))
          row['batch_size'] = examples
          row.update(counts[name])
          spec = accounting.paper_model_gmacs(
              name, settings.trunk, settings.output_stride,
              settings.task_configs[name], counts[name])
          if spec:
            row['paper_model'] = spec
          row['train_gflop_per_example'] = round(
              counts[name]['forward_gmacs'] * accounting.TRAINING_FLOPS_PER_MAC,
              4)
          environment.reset_peak_memory()
          try:
            timing = time_steps(
                lambda n=name: train_steps[n](*resident[n]), warmup_steps,
                steps, windows)
          except Exception as e:  # pylint: disable=broad-except
            row['error'] = error_text(e)
            rows.append(row)
            log(f'{name} {precision} xla={xla}: {row["error"]}')
            continue
          _timed(row, timing, examples, steps, windows)
          row.update(compile_s=round(timing.compile_s, 3),
                     warmup_steps=warmup_steps,
                     loss=float(timing.output['loss']),
                     finite=bool(timing.output['finite']))
          accounting.utilization(row, peak)
          results[name] = row
          rows.append(row)
          log(step_line(row))
        if multi_task and len(results) > 1:
          names = list(results)

          def cycle(names=names):
            out = None
            for n in names:
              out = train_steps[n](*resident[n])
            return out

          row = dict(base, task='multi', tasks=names)
          environment.reset_peak_memory()
          timing = time_steps(cycle, 1, steps, windows)
          examples = sum(results[n]['batch_size'] for n in names)
          gflop = sum(results[n]['train_gflop_per_example'] *
                      results[n]['batch_size'] for n in names)
          _timed(row, timing, examples, steps, windows)
          row.update(batch_size=examples,
                     forward_gmacs=round(sum(
                         results[n]['forward_gmacs'] * results[n]['batch_size']
                         for n in names) / examples, 4),
                     train_gflop_per_example=round(gflop / examples, 4))
          accounting.utilization(row, peak)
          rows.append(row)
          log(step_line(row))
        del model, train_steps, resident
        tf_keras.backend.clear_session()
        gc.collect()
  return rows


def step_line(row) -> str:
  mfu = f' MFU {100 * row["mfu"]:.1f}%' if row.get('mfu') is not None else ''
  memory = (f', peak {row["peak_memory_mib"]:.0f} MiB'
            if row.get('peak_memory_mib') is not None else '')
  return (f'{row["task"]:5s} {row["precision"]} xla={int(row["xla"])} '
          f'atrous={"native" if row["native_atrous"] else "s2b"} '
          f'batch {row["batch_size"]}: {row["step_s"]:.4f} s/step, '
          f'{row["examples_per_s"]:.2f} ex/s, '
          f'{row["achieved_tflops"]:.3f} TFLOP/s{mfu}{memory}')
