"""What a benchmark runs: a preset's trunk and tasks with overrides, and one
batch per task from its own pipeline."""

import dataclasses
from typing import Dict, Mapping, Optional, Sequence

from mtssl import tasks as tasks_lib
from mtssl.backbones import resnet_v2
from mtssl.configs import training as configs


class BenchmarkError(ValueError):
  """An invalid benchmark setting; the message names it."""


@dataclasses.dataclass
class ModelSettings:
  """What the step benchmark builds: a trunk and tasks with their configs."""
  trunk: str
  output_stride: int
  task_configs: Dict[str, tasks_lib.TaskConfig]
  data: Dict[str, str] = dataclasses.field(default_factory=dict)
  seed: int = 0

  @property
  def task_names(self):
    return list(self.task_configs)


def settings_from_preset(preset: str, tasks: Optional[Sequence[str]] = None,
                         trunk: Optional[str] = None,
                         batch_sizes: Optional[Mapping[str, int]] = None,
                         task_overrides: Optional[Mapping[str, Mapping]] = None,
                         output_stride: Optional[int] = None) -> ModelSettings:
  """A preset of mtssl.configs.training (`paper` or `cpu`) with overrides."""
  if preset not in configs.PRESETS:
    raise BenchmarkError(f'--config: unknown preset {preset!r}; choose one of '
                         f'{", ".join(sorted(configs.PRESETS))}.')
  config = configs.PRESETS[preset](list(tasks) if tasks else None)
  trunk = trunk or config.trunk
  if trunk not in resnet_v2.TRUNK_BLOCKS:
    raise BenchmarkError(f'--trunk: unknown trunk {trunk!r}; choose one of '
                         f'{", ".join(sorted(resnet_v2.TRUNK_BLOCKS))}.')
  task_overrides = dict(task_overrides or {})
  unknown = set(task_overrides) - set(config.tasks)
  if unknown:
    raise BenchmarkError(f'--task_overrides names tasks that are not run: '
                         f'{sorted(unknown)}.')
  task_configs = {}
  for name, run in config.tasks.items():
    values = dict(task_overrides.get(name, {}))
    if batch_sizes and name in batch_sizes:
      values['batch_size'] = batch_sizes[name]
    fields = {f.name for f in dataclasses.fields(run.config)}
    bad = set(values) - fields
    if bad:
      raise BenchmarkError(f'{name} has no setting(s) {sorted(bad)}.')
    values = {k: tuple(v) if isinstance(v, list) else v
              for k, v in values.items()}
    try:
      task_configs[name] = dataclasses.replace(run.config, **values)
    except ValueError as e:
      raise BenchmarkError(f'{name}: {e}') from None
  return ModelSettings(trunk=trunk,
                       output_stride=output_stride or config.output_stride,
                       task_configs=task_configs,
                       data={n: r.data for n, r in config.tasks.items()},
                       seed=config.seed)


def make_task(name: str, config=None) -> tasks_lib.Task:
  return tasks_lib.get_task_class(name)(config)


def first_batches(task_objects: Mapping[str, tasks_lib.Task],
                  data: Mapping[str, str], seed: int):
  """One (features, labels) batch per task from its own pipeline."""
  out = {}
  for name, task in task_objects.items():
    source = task.make_source(data.get(name, 'synthetic'))
    source.validate()
    iterator = iter(task.make_dataset(source, task.config.batch_size, seed=seed))
    try:
      out[name] = next(iterator)
    finally:
      del iterator
  return out
