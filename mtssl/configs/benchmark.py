"""Configuration of `python -m mtssl.benchmark`: one dataclass tree.

Flags are generated from it (mtssl.configs.base): `ModelChoice`,
`StepOptions` and the top level without prefix (`--config`, `--steps`,
`--what`, ...), `PipelineOptions` as `--pipeline_<field>` and
`TargetOptions` as `--target_<field>`.
"""

import dataclasses
import json
from typing import Dict, List, Optional, Sequence, Tuple

from mtssl import tasks as tasks_lib
from mtssl.benchmarking import environment
from mtssl.configs import base
from mtssl.configs import training as training_configs
from mtssl.configs.base import ConfigError

WHAT = ('steps', 'pipelines', 'all')
PRECISIONS = ('fp32', 'bf16', 'fp16')
PIPELINE_INPUTS = ('memory', 'jpeg')
PIPELINE_VARIANTS = ('fast', 'plain', 'device')
_TRUE = ('true', '1', 'on', 'yes')
_FALSE = ('false', '0', 'off', 'no')


def parse_bools(values: Sequence[str], flag: str) -> List[bool]:
  """['false', 'true'] -> [False, True]; ConfigError naming `flag`."""
  out = []
  for value in values:
    low = value.strip().lower()
    if low in _TRUE:
      out.append(True)
    elif low in _FALSE:
      out.append(False)
    else:
      raise ConfigError(f'--{flag}: {value!r} is not true or false.')
  if not out:
    raise ConfigError(f'--{flag} is empty.')
  return out


def parse_batch_sizes(values: Sequence[str],
                      tasks: Sequence[str]) -> Dict[str, int]:
  """['16'] or ['rp:16', 'col:32'] -> {task: batch size}."""
  out = {}
  for value in values or ():
    if ':' in value:
      task, _, number = value.partition(':')
      if task not in tasks:
        raise ConfigError(f'--batch_size: {task!r} is not among the tasks '
                          f'{",".join(tasks)}.')
      targets = [task]
    else:
      number, targets = value, list(tasks)
    try:
      size = int(number)
    except ValueError:
      raise ConfigError(f'--batch_size: {value!r} is not a number or '
                        f'task:number.') from None
    if size <= 0:
      raise ConfigError(f'--batch_size: {value!r} must be positive.')
    out.update({t: size for t in targets})
  return out


def _check_choices(values: Sequence[str], choices: Sequence[str], flag: str,
                   what: str):
  if not values:
    raise ConfigError(f'--{flag} is empty.')
  for value in values:
    if value not in choices:
      raise ConfigError(f'--{flag}: unknown {what} {value!r}; choose from '
                        f'{", ".join(choices)}.')


@dataclasses.dataclass
class ModelChoice:
  """The model the steps are built from and the pipelines' task configs."""
  config: str = base.field('paper', 'preset (mtssl/configs/training.py) the '
                           'model comes from',
                           choices=sorted(training_configs.PRESETS))
  tasks: Optional[Tuple[str, ...]] = base.field(
      None, 'tasks, any of ' + ', '.join(tasks_lib.task_names())
      + '; None: the preset\'s')
  trunk: Optional[str] = base.field(None, 'trunk; None: the preset\'s')
  batch_size: Optional[Tuple[str, ...]] = base.field(
      None, 'batch size for every task (16) or per task (rp:16,col:32); None: '
      'the preset\'s')
  task_overrides: Optional[str] = base.field(
      None, 'JSON {task: {field: value}} applied to the preset\'s task configs')

  def overrides(self) -> Dict[str, Dict[str, object]]:
    """--task_overrides parsed; ConfigError if it is not a JSON object."""
    if not self.task_overrides:
      return {}
    try:
      value = json.loads(self.task_overrides)
    except json.JSONDecodeError as e:
      raise ConfigError(f'--task_overrides is not JSON: {e}') from None
    if not isinstance(value, dict):
      raise ConfigError('--task_overrides must be a JSON object '
                        '{task: {field: value}}.')
    return value

  def validate(self):
    if self.tasks is not None:
      known = tasks_lib.task_names()
      _check_choices(self.tasks, known, 'tasks', 'task')
      if len(set(self.tasks)) != len(self.tasks):
        raise ConfigError(f'--tasks lists a task twice: '
                          f'{",".join(self.tasks)}.')
    self.overrides()

  def task_names(self) -> List[str]:
    """The tasks run: --tasks or the preset's."""
    tasks = list(self.tasks) if self.tasks else None
    return list(training_configs.PRESETS[self.config](tasks).tasks)


@dataclasses.dataclass
class StepOptions:
  """The step benchmark's combinations and timing."""
  precisions: Tuple[str, ...] = base.field(
      PRECISIONS, 'fp32, bf16, fp16 (mixed precision, fp16 loss-scaled)')
  xla: Tuple[str, ...] = base.field(('false', 'true'), 'XLA off and/or on')
  native_atrous: Tuple[str, ...] = base.field(
      ('false',), 'dilated convolutions as single Conv2D ops (false, true)')
  warmup_steps: int = base.field(2, 'untimed steps (the first compiles)')
  steps: int = base.field(10, 'timed steps per window')
  windows: int = base.field(3, 'timed windows; the step time is the median '
                            'of their means')
  multi_task: bool = base.field(True, 'also time round-robin cycles over all '
                                'tasks')
  peak_tflops: Optional[float] = base.field(
      None, 'device peak for MFU; None: the known accelerator\'s (none on a '
      'CPU)')

  def xla_values(self) -> List[bool]:
    return parse_bools(self.xla, 'xla')

  def native_atrous_values(self) -> List[bool]:
    return parse_bools(self.native_atrous, 'native_atrous')

  def validate(self):
    _check_choices(self.precisions, PRECISIONS, 'precisions', 'precision')
    self.xla_values()
    self.native_atrous_values()
    for name in ('warmup_steps', 'steps', 'windows'):
      if getattr(self, name) < 1:
        raise ConfigError(f'--{name} must be at least 1, got '
                          f'{getattr(self, name)}.')


@dataclasses.dataclass
class PipelineOptions:
  """The pipeline benchmark (flags --pipeline_<field>)."""
  batch_size: int = base.field(32, 'pipeline batch size')
  batches: int = base.field(8, 'timed pipeline batches')
  images: int = base.field(16, 'distinct images in memory')
  image_size: Tuple[int, int] = base.field(
      (375, 500), 'height,width of the images of the image tasks')
  inputs: Tuple[str, ...] = base.field(
      PIPELINE_INPUTS, 'memory (decoded) and/or jpeg (decoded in the '
      'pipeline)')
  variants: Tuple[str, ...] = base.field(
      PIPELINE_VARIANTS, 'fast (the task configs as given), plain '
      '(fast_preprocessing off) and/or device (device_preprocessing on: the '
      'host\'s share of the work)')

  def validate(self):
    for name in ('batch_size', 'batches', 'images'):
      if getattr(self, name) < 1:
        raise ConfigError(f'--pipeline_{name} must be at least 1, got '
                          f'{getattr(self, name)}.')
    if len(self.image_size) != 2 or min(self.image_size) < 1:
      raise ConfigError(f'--pipeline_image_size must be two positive '
                        f'integers height,width, got {self.image_size}.')
    _check_choices(self.inputs, PIPELINE_INPUTS, 'pipeline_inputs', 'input')
    _check_choices(self.variants, PIPELINE_VARIANTS, 'pipeline_variants',
                   'variant')


@dataclasses.dataclass
class TargetOptions:
  """The accelerator the pipelines must feed (flags --target_<field>)."""
  mfu: float = base.field(0.35, 'MFU of the training rate the pipelines are '
                          'compared with')
  peak_tflops: float = base.field(environment.H100_BF16_PEAK_TFLOPS,
                                  'peak of the accelerator the pipelines must '
                                  'feed')

  def validate(self):
    if not 0 < self.mfu <= 1:
      raise ConfigError(f'--target_mfu must be in (0, 1], got {self.mfu}.')
    if self.peak_tflops <= 0:
      raise ConfigError(f'--target_peak_tflops must be positive, got '
                        f'{self.peak_tflops}.')


@dataclasses.dataclass
class BenchmarkConfig:
  """A whole benchmark run."""
  what: Tuple[str, ...] = base.field(('all',), 'steps, pipelines or all')
  output_dir: str = base.field('benchmarks/results', 'where the JSON and '
                               'markdown go')
  name: Optional[str] = base.field(None, 'file name without extension; '
                                   'None: <date>-<device>')
  model: ModelChoice = dataclasses.field(default_factory=ModelChoice)
  step: StepOptions = dataclasses.field(default_factory=StepOptions)
  pipeline: PipelineOptions = dataclasses.field(
      default_factory=PipelineOptions)
  target: TargetOptions = dataclasses.field(default_factory=TargetOptions)

  def parts(self) -> set:
    """{'steps', 'pipelines'} or a part of it."""
    _check_choices(self.what, WHAT, 'what', 'part')
    return {'steps', 'pipelines'} if 'all' in self.what else set(self.what)

  def validate(self):
    parts = self.parts()
    self.model.validate()
    if 'steps' in parts:
      self.step.validate()
    if 'pipelines' in parts:
      self.pipeline.validate()
      self.target.validate()


# (prefix, class, the BenchmarkConfig field holding it or None for the top).
FLAG_GROUPS = (('', BenchmarkConfig, None), ('', ModelChoice, 'model'),
               ('', StepOptions, 'step'), ('pipeline_', PipelineOptions,
                                           'pipeline'),
               ('target_', TargetOptions, 'target'))


def define_flags(flag_values=None):
  """Defines every flag of the tree (on absl's FLAGS by default)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flag_values if flag_values is not None else flags.FLAGS
  default = BenchmarkConfig()
  for prefix, cls, attr in FLAG_GROUPS:
    base.define_flags(cls, prefix=prefix,
                      defaults=getattr(default, attr) if attr else default,
                      flag_values=fv)


def config_from_flags(flag_values) -> BenchmarkConfig:
  """The default configuration with every given flag applied."""
  config = BenchmarkConfig()
  for prefix, cls, attr in FLAG_GROUPS:
    given = base.given_values(flag_values, prefix, cls)
    if attr is None:
      config = dataclasses.replace(config, **given)
    else:
      setattr(config, attr,
              dataclasses.replace(getattr(config, attr), **given))
  config.validate()
  return config


def given_flags(flag_values) -> List[str]:
  """`--name=value` of every flag of the tree that was given."""
  out = []
  for prefix, cls, _ in FLAG_GROUPS:
    for f, _ in base.config_fields(cls):
      flag = flag_values[prefix + f.name]
      if flag.present:
        value = flag.value
        if isinstance(value, list):
          value = ','.join(map(str, value))
        out.append(f'--{prefix}{f.name}={value}')
  return out
