"""One benchmark run from its configuration: steps, pipelines, the report."""

import dataclasses
from typing import Dict, Tuple

from mtssl.benchmarking import accounting
from mtssl.benchmarking import environment
from mtssl.benchmarking import pipelines
from mtssl.benchmarking import report as report_lib
from mtssl.benchmarking import settings as settings_lib
from mtssl.benchmarking import steps
from mtssl.configs import benchmark as configs


def model_settings(config: configs.ModelChoice) -> settings_lib.ModelSettings:
  """The preset with --tasks, --trunk, --batch_size and --task_overrides."""
  overrides = config.overrides()
  tasks = list(config.tasks) if config.tasks else None
  batch_sizes = configs.parse_batch_sizes(config.batch_size,
                                          config.task_names())
  return settings_lib.settings_from_preset(config.config, tasks, config.trunk,
                                           batch_sizes, overrides)


def run_benchmark(config: configs.BenchmarkConfig, command: str,
                  log=print) -> Tuple[Dict[str, object], Dict[str, str]]:
  """Runs the parts `config.what` names; (report, written paths)."""
  config.validate()
  parts = config.parts()
  settings = model_settings(config.model)
  report = {'environment': environment.environment(),
            'command': command,
            'settings': {'config': config.model.config,
                         'trunk': settings.trunk,
                         'output_stride': settings.output_stride,
                         'tasks': {n: dataclasses.asdict(c) for n, c in
                                   settings.task_configs.items()}},
            'results': []}
  rows = report['results']
  if 'steps' in parts:
    device = environment.device_name()
    option = config.step
    for precision in option.precisions:
      peak = option.peak_tflops or environment.peak_tflops(device, precision)
      rows += steps.benchmark_steps(
          settings, [precision], option.xla_values(),
          option.native_atrous_values(), option.warmup_steps, option.steps,
          option.multi_task, peak, windows=option.windows, log=log)
  if 'pipelines' in parts:
    counted = {r['task']: r['forward_gmacs'] for r in rows
               if r.get('kind') == 'step' and 'forward_gmacs' in r
               and r['task'] != 'multi'}
    if settings.trunk != 'resnet_v2_101' or not counted:
      counted = accounting.paper_forward_gmacs()
    target = config.target
    report['target'] = (f'{target.mfu:.0%} MFU of {target.peak_tflops:g} '
                        f'TFLOP/s (the paper\'s model, H100 bf16 dense)')
    option = config.pipeline
    rows += pipelines.benchmark_pipelines(
        settings.task_configs, batch_size=option.batch_size,
        batches=option.batches, warmup_batches=2, num_images=option.images,
        image_size=tuple(option.image_size), encodings=option.inputs,
        variants=option.variants,
        target_rates=accounting.target_rates(
            {n: counted[n] for n in settings.task_names if n in counted},
            target.mfu, target.peak_tflops),
        seed=settings.seed, log=log)
  report['load_average_after'] = environment.load_average()
  paths = report_lib.write_report(report, config.output_dir,
                                  config.name or environment.default_name())
  return report, paths
