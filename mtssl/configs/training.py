"""Training configuration as code: the `TrainConfig` tree and two presets.

`cpu` (the default) is the paper's structure at a size a 2-core CPU trains
in minutes; `paper` is ResNet-v2-101 with the paper's heads, inputs and
compute accounting. Flags (mtssl.configs.base) override fields of a preset.

Typical use:

    config = cpu_config(['rp', 'col'])
    config = paper_config(['rp', 'col', 'ex', 'ms'])
"""

import dataclasses
import re
from typing import Dict, Optional, Sequence, Tuple

from mtssl import tasks as tasks_lib
from mtssl.configs import base
from mtssl.configs.base import ConfigError  # pylint: disable=unused-import
from mtssl.backbones import resnet_v2

_SERVICE_ADDRESS = re.compile(r'^(grpc://)?[^:/\s]+:\d{1,5}$')
IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_TOTAL_GPU_HOURS = 16_800.0
PAPER_SNAPSHOT_GPU_HOURS = 2_400.0

MIXED_PRECISION = ('none', 'bf16', 'fp16')
SCHEDULES = ('round_robin', 'weighted')
COST_MODELS = ('measured', 'paper')
DATA_SERVICE_MODES = ('dynamic', 'off')


def paper_seconds_per_example(task: str) -> Optional[float]:
  """K40 GPU-seconds per example of `task` (paper section 6.1), or None."""
  hours = tasks_lib.get_task_class(task).paper_epoch_gpu_hours
  return None if hours is None else hours * 3600.0 / IMAGENET_TRAIN_IMAGES


@dataclasses.dataclass
class TaskRun:
  """How one task takes part in a run (flags --<task>_<field>)."""
  config: tasks_lib.TaskConfig
  data: str = base.field(
      'synthetic', 'data source: synthetic, folder:/path, tfds:name[:split] or '
      'tfrecord:/dir/or/glob (ms: synthetic or tfrecord:/dir of motion shards; '
      'ti: synthetic or graph:/dir)')
  learning_rate: float = base.field(1e-3, 'RMSProp learning rate (constant, as in '
                                'the paper)')
  step_cost: Optional[float] = base.field(
      None, 'device-hours per step for compute accounting (default: measured, '
      'or the paper figure with --cost_model=paper)')
  weight: float = base.field(1.0, 'relative frequency under --schedule=weighted')
  data_service: Optional[str] = base.field(
      None, 'tf.data service dispatcher (grpc://HOST:PORT) for this task\'s '
      'pipeline; overrides --data_service')


@dataclasses.dataclass
class TrainConfig:
  """A whole pre-training run (flags --<field>)."""
  tasks: Dict[str, TaskRun]
  model_dir: str = base.field('runs/default', 'checkpoints, snapshots and '
                          'TensorBoard logs; an existing run there is resumed')
  trunk: str = base.field('resnet_v2_101', 'trunk, one of '
                      + ', '.join(sorted(resnet_v2.TRUNK_BLOCKS)),
                      choices=sorted(resnet_v2.TRUNK_BLOCKS))
  output_stride: int = base.field(8, 'trunk output stride (8 in the paper)')
  lasso: bool = base.field(False, 'feed each head a lasso combination of the '
                       'block-3 units (paper section 3.2)')
  lasso_l1: float = base.field(1e-3, 'L1 weight on each task\'s lasso alpha')
  rmsprop_decay: float = base.field(0.9, 'RMSProp decay of the squared-gradient '
                                'average (TF1 default)')
  rmsprop_momentum: float = base.field(0.0, 'RMSProp momentum (TF1 default 0)')
  rmsprop_epsilon: float = base.field(1e-10, 'RMSProp epsilon, inside the square '
                                  'root (TF1 default)')
  mixed_precision: str = base.field('none', 'none, bf16 or fp16 (fp16 with dynamic '
                                'loss scaling)', choices=MIXED_PRECISION)
  xla: bool = base.field(False, 'compile each train step with XLA')
  native_atrous: bool = base.field(
      False, 'run the trunk\'s dilated convolutions as single Conv2D ops '
      '(faster with cuDNN and XLA; on a CPU it needs --xla)')
  prefetch_to_device: bool = base.field(
      True, 'copy the next input batches onto the GPU while a step runs '
      '(one machine; no effect without a GPU)')
  schedule: str = base.field('round_robin', 'task interleaving: round_robin or '
                         'weighted (seeded draw per step)', choices=SCHEDULES)
  steps: Optional[int] = base.field(None, 'total training steps over all tasks')
  max_cost: Optional[float] = base.field(None, 'stop when the total compute cost '
                                     'reaches this many device-hours')
  cost_model: str = base.field('measured', 'step cost: measured step time or the '
                           'paper\'s K40 figures', choices=COST_MODELS)
  snapshot_cost: Optional[float] = base.field(
      None, 'keep a snapshot each time the total cost crosses a multiple of '
      'this many device-hours (paper: 2400)')
  checkpoint_every: int = base.field(1000, 'write a checkpoint every N steps')
  keep_checkpoints: int = base.field(3, 'how many regular checkpoints to keep')
  init_checkpoint: Optional[str] = base.field(
      None, 'initialize the trunk (and heads present) from a converted Slim '
      'or a previous run\'s checkpoint')
  seed: int = base.field(0, 'seed of the data streams and the schedule')
  max_nonfinite_steps: int = base.field(20, 'stop after this many consecutive '
                                    'non-finite steps of one task')
  log_every: int = base.field(10, 'progress line every N steps')
  summary_every: int = base.field(50, 'TensorBoard scalars every N steps')
  image_summary_every: int = base.field(500, 'TensorBoard images every N steps')
  profile_steps: Optional[Tuple[int, ...]] = base.field(
      None, 'write a TensorBoard profile of global steps A to B into '
      'model_dir, e.g. 20,30')
  deterministic: bool = base.field(False, 'enable TensorFlow op determinism '
                               '(bit-exact resume on CPU; slower)')
  tfds_data_dir: Optional[str] = base.field(None, 'TFDS data_dir for tfds: sources')
  data_service: Optional[str] = base.field(
      None, 'tf.data service dispatcher (grpc://HOST:PORT, started by python -m '
      'mtssl.data_service) that runs every task\'s input pipeline; tfrecord: '
      'sources only')
  data_service_mode: str = base.field(
      'dynamic', 'dynamic: each stream position once, any order; off: every '
      'worker runs the whole stream (one worker: the local batches exactly)',
      choices=DATA_SERVICE_MODES)
  max_consecutive_skips: int = base.field(
      1000, 'stop with an error naming the source after this many skipped '
      'elements in a row (or a whole epoch of a finite source skipped)')
  max_image_pixels: int = base.field(
      36_000_000, 'skip (and count) images whose header gives more pixels '
      'than this, before decoding them')

  def data_service_for(self, name: str) -> Optional[str]:
    """The tf.data service that runs task `name`'s pipeline (its own
    --<task>_data_service, else --data_service), or None."""
    return self.tasks[name].data_service or self.data_service

  def validate(self):
    """Raises ConfigError naming the first invalid field."""
    if not self.tasks:
      raise ConfigError('tasks: at least one task is needed.')
    known = tasks_lib.task_names()
    base.check_finite(self)
    for name, run in self.tasks.items():
      base.check_finite(run, f'{name}_')
      base.check_finite(run.config, f'{name}_')
      if name not in known:
        raise ConfigError(f'tasks: unknown task {name!r}; known tasks: '
                          f'{", ".join(known)}.')
      try:
        run.config.validate()
      except ValueError as e:
        raise ConfigError(f'{name}: {e}') from None
      if run.learning_rate <= 0:
        raise ConfigError(f'{name}_learning_rate must be positive, got '
                          f'{run.learning_rate}.')
      if run.step_cost is not None and run.step_cost <= 0:
        raise ConfigError(f'{name}_step_cost must be positive, got '
                          f'{run.step_cost}.')
      if run.weight <= 0:
        raise ConfigError(f'{name}_weight must be positive, got {run.weight}.')
    try:
      resnet_v2.check_trunk(self.trunk, self.output_stride)
    except ValueError as e:
      field = 'trunk' if self.trunk not in resnet_v2.TRUNK_BLOCKS else (
          'output_stride')
      raise ConfigError(f'{field}: {e}') from None
    if self.lasso and self.output_stride > 16:
      raise ConfigError('lasso needs output_stride 8 or 16 (all block-3 units '
                        'at one resolution).')
    if self.lasso_l1 < 0:
      raise ConfigError(f'lasso_l1 must be >= 0, got {self.lasso_l1}.')
    if self.mixed_precision not in MIXED_PRECISION:
      raise ConfigError(f'mixed_precision must be one of {MIXED_PRECISION}, got '
                        f'{self.mixed_precision!r}.')
    if self.schedule not in SCHEDULES:
      raise ConfigError(f'schedule must be one of {SCHEDULES}, got '
                        f'{self.schedule!r}.')
    if self.cost_model not in COST_MODELS:
      raise ConfigError(f'cost_model must be one of {COST_MODELS}, got '
                        f'{self.cost_model!r}.')
    if self.cost_model == 'paper':
      for name, run in self.tasks.items():
        if run.step_cost is None and paper_seconds_per_example(name) is None:
          raise ConfigError(f'cost_model=paper: the paper gives no per-step '
                            f'cost for {name}; set {name}_step_cost.')
    if self.steps is None and self.max_cost is None:
      raise ConfigError('Set steps or max_cost (the run needs an end).')
    for field in ('steps', 'checkpoint_every', 'keep_checkpoints', 'log_every',
                  'summary_every', 'image_summary_every', 'max_nonfinite_steps',
                  'max_consecutive_skips', 'max_image_pixels'):
      value = getattr(self, field)
      if value is not None and value <= 0:
        raise ConfigError(f'{field} must be positive, got {value}.')
    for field in ('max_cost', 'snapshot_cost'):
      value = getattr(self, field)
      if value is not None and value <= 0:
        raise ConfigError(f'{field} must be positive, got {value}.')
    for field in ('rmsprop_decay', 'rmsprop_momentum'):
      value = getattr(self, field)
      if not 0 <= value < 1:
        raise ConfigError(f'{field} must be in [0, 1), got {value}.')
    if self.snapshot_cost is not None:
      for name, run in self.tasks.items():
        cost = (self.step_cost_from_paper(name)
                if run.step_cost is not None or self.cost_model == 'paper'
                else None)
        if cost is not None and self.snapshot_cost < cost:
          raise ConfigError(
              f'snapshot_cost {self.snapshot_cost:g} is below the cost of one '
              f'{name} step ({cost:g} device-hours): every step would cross '
              f'a multiple.')
    if self.rmsprop_epsilon <= 0:
      raise ConfigError(f'rmsprop_epsilon must be positive, got '
                        f'{self.rmsprop_epsilon}.')
    if not self.model_dir:
      raise ConfigError('model_dir must be set.')
    if self.profile_steps is not None and (
        len(self.profile_steps) != 2 or not
        1 <= self.profile_steps[0] <= self.profile_steps[1]):
      raise ConfigError(
          'profile_steps must be two global steps A,B with 1 <= A <= B, got '
          f'{",".join(map(str, self.profile_steps))}.')
    if self.data_service_mode not in DATA_SERVICE_MODES:
      raise ConfigError(f'data_service_mode must be one of '
                        f'{DATA_SERVICE_MODES}, got {self.data_service_mode!r}.')
    for name, address in [('data_service', self.data_service)] + [
        (f'{n}_data_service', r.data_service) for n, r in self.tasks.items()]:
      if address is not None and not _SERVICE_ADDRESS.match(address):
        raise ConfigError(f'{name}={address!r} is not grpc://HOST:PORT.')

  def step_cost_from_paper(self, name: str) -> Optional[float]:
    """Device-hours per step of task `name` under the paper's accounting."""
    run = self.tasks[name]
    if run.step_cost is not None:
      return run.step_cost
    seconds = paper_seconds_per_example(name)
    if seconds is None:
      return None
    return seconds * run.config.batch_size / 3600.0


CPU_TASKS = ('rp', 'col')
PAPER_TASKS = ('rp', 'col', 'ex', 'ms')


def _task_runs(names: Sequence[str], cpu: bool = False) -> Dict[str, TaskRun]:
  """Default TaskRuns; with `cpu`, each task's CPU-preset overrides."""
  runs = {}
  for name in names:
    cls = tasks_lib.get_task_class(name)
    values = dict(cls.cpu_overrides) if cpu else {}
    runs[name] = TaskRun(config=cls.config_class(**values))
  return runs


def cpu_config(tasks: Optional[Sequence[str]] = None,
               gpu: bool = False) -> TrainConfig:
  """The default run: a few minutes on a 2-core CPU, built-in data (the same
  on a GPU)."""
  del gpu
  return TrainConfig(
      tasks=_task_runs(tasks or CPU_TASKS, cpu=True),
      model_dir='runs/cpu_default',
      trunk='resnet_v2_small',
      output_stride=8,
      steps=300,
      checkpoint_every=100,
      log_every=10,
      summary_every=20,
      image_summary_every=100,
  )


def paper_config(tasks: Optional[Sequence[str]] = None,
                 gpu: bool = False) -> TrainConfig:
  """The paper's configuration: ResNet-v2-101, 16.8 K K40 GPU-hours.

  With `gpu` (a GPU is present), the compiled fast path: bf16 mixed precision,
  XLA, the space-to-batch atrous form, and each task's `gpu_overrides` (its
  GPU batch size, preprocessing in the compiled step).
  """
  runs = _task_runs(tasks or PAPER_TASKS)
  fast = {}
  if gpu:
    fast = dict(mixed_precision='bf16', xla=True, native_atrous=False)
    for name, run in runs.items():
      overrides = tasks_lib.get_task_class(name).gpu_overrides
      runs[name] = dataclasses.replace(
          run, config=dataclasses.replace(run.config, **overrides))
  return TrainConfig(
      tasks=runs,
      **fast,
      model_dir='runs/paper',
      trunk='resnet_v2_101',
      output_stride=8,
      max_cost=PAPER_TOTAL_GPU_HOURS,
      cost_model='paper',
      snapshot_cost=PAPER_SNAPSHOT_GPU_HOURS,
      checkpoint_every=1000,
      log_every=100,
      summary_every=100,
      image_summary_every=2000,
  )


PRESETS = {'cpu': cpu_config, 'paper': paper_config}
