r"""Multi-task self-supervised pre-training: `python -m mtssl.train`.

  python -m mtssl.train                          # CPU-sized default run, rp+col
  python -m mtssl.train --tasks=rp,col,ex,ms --steps=2000
  python -m mtssl.train --flagfile=flags/rp_col.flags --model_dir=/runs/rp_col

`--config` picks a preset from mtssl/configs.py (`cpu`, the default, or
`paper`); every other flag overrides one field of it. Flags are generated once
from the configuration dataclasses: global ones from `TrainConfig`
(`--steps`, `--mixed_precision`, ...) and per task from `TaskRun` and the
task's own config (`--rp_data`, `--rp_learning_rate`, `--rp_batch_size`,
`--col_<field>`, ...). `--helpfull` lists them all.

Flags and data sources are validated before any work: a bad value prints one
line naming it and exits with status 2. A run whose loss stays non-finite ends
with status 3; SIGINT/SIGTERM end the run after the current step with a
checkpoint (status 130 / 143).

On a cluster (TF_CONFIG describing one, or `--cluster_resolver=slurm`) the
same command runs in every process and the process's task type picks its role
(mtssl/training/distributed.py): the `chief` coordinates and checkpoints,
`ps` and `worker` serve; `--task_workers=rp:2,col:1` says which workers train
which task. A lost parameter server ends the coordinator with status 4.

  TF_CONFIG='{"cluster": {...}, "task": {"type": "worker", "index": 0}}' \
      python -m mtssl.train --tasks=rp,col --task_workers=rp:2,col:1 ...
"""

import dataclasses
import os
import signal
import sys
import typing

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging

from mtssl import configs  # pylint: disable=wrong-import-position
from mtssl import tasks as tasks_lib
from mtssl.data import sources as sources_lib
from mtssl.training import distributed

FLAGS = flags.FLAGS
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_CLUSTER = 4

_CONFIG = flags.DEFINE_enum('config', 'cpu', sorted(configs.PRESETS),
                            'preset every other flag overrides (mtssl/configs.py)')
_TASKS = flags.DEFINE_list('tasks', None,
                           'tasks to train jointly, any of '
                           + ', '.join(tasks_lib.task_names())
                           + ' (default: the preset\'s)')
_CLUSTER_RESOLVER = flags.DEFINE_enum(
    'cluster_resolver', 'auto', distributed.RESOLVERS,
    'cluster: auto (TF_CONFIG when it describes a cluster, else one machine), '
    'tfconfig, or slurm (coordinator = Slurm task 0, then parameter servers, '
    'then the --task_workers workers)')
_TASK_WORKERS = flags.DEFINE_string(
    'task_workers', None,
    'cluster: workers per task, e.g. rp:4,col:2,ex:1,ms:1; worker indices are '
    'assigned in --tasks order and the total must equal the cluster\'s workers')
_TASK_STEPS = flags.DEFINE_string(
    'task_steps', None,
    'cluster: stop a task after this many applied rounds, e.g. rp:1000,col:500 '
    '(the run ends when every task has stopped, or at --steps / --max_cost)')
_TASK_DELAY = flags.DEFINE_string(
    'task_delay', None,
    'cluster, testing aid: extra seconds per step on a task\'s workers, e.g. '
    'col:2 (simulates a slow task)')
_SLURM_PORT_BASE = flags.DEFINE_integer(
    'slurm_port_base', 8888, 'cluster: first port of the servers of each node '
    'under --cluster_resolver=slurm')


class _TupleOf:
  """A tuple-of-numbers field, given on the command line as a comma list."""

  def __init__(self, element):
    self.element = element

  def parse(self, values):
    return tuple(self.element(v) for v in values)


def _scalar_type(annotation):
  """Flag kind of a field: int/float/bool/str, _TupleOf(int|float), or None."""
  if typing.get_origin(annotation) is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != 1:
      return None
    annotation = args[0]
  if typing.get_origin(annotation) is tuple:
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if args and all(a is args[0] for a in args) and args[0] in (int, float):
      return _TupleOf(args[0])
    return None
  return annotation if annotation in (int, float, bool, str) else None


def _define(name, kind, help_text, choices=None):
  if isinstance(kind, _TupleOf):
    flags.DEFINE_list(name, None, f'{help_text} (comma-separated)')
  elif kind is bool:
    flags.DEFINE_bool(name, None, help_text)
  elif choices:
    flags.DEFINE_enum(name, None, list(choices), help_text)
  elif kind is int:
    flags.DEFINE_integer(name, None, help_text)
  elif kind is float:
    flags.DEFINE_float(name, None, help_text)
  else:
    flags.DEFINE_string(name, None, help_text)


def _config_fields(cls):
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    kind = _scalar_type(hints.get(field.name))
    if kind is not None:
      yield field, kind


def _define_flags():
  for field, kind in _config_fields(configs.TrainConfig):
    _define(field.name, kind, field.metadata.get('help', field.name),
            field.metadata.get('choices'))
  for task in tasks_lib.task_names():
    for field, kind in _config_fields(configs.TaskRun):
      _define(f'{task}_{field.name}', kind,
              f'{task}: {field.metadata.get("help", field.name)}')
    config_class = tasks_lib.get_task_class(task).config_class
    for field, kind in _config_fields(config_class):
      if field.default is not dataclasses.MISSING:
        default = field.default
      elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
      else:
        default = None
      _define(f'{task}_{field.name}', kind,
              f'{task}: {field.metadata.get("help", field.name)} '
              f'(task default {default!r})', field.metadata.get('choices'))


_define_flags()


def _given(flag_values, prefix, cls):
  """{field: value} for the fields of `cls` whose flag `prefix+field` was set."""
  out = {}
  for field, kind in _config_fields(cls):
    value = flag_values[prefix + field.name].value
    if value is None:
      continue
    if isinstance(kind, _TupleOf):
      try:
        value = kind.parse(value)
      except ValueError:
        raise configs.ConfigError(
            f'--{prefix}{field.name}: expected comma-separated '
            f'{kind.element.__name__} values, got {",".join(value)!r}.') from None
    out[field.name] = value
  return out


def config_from_flags(flag_values=FLAGS) -> configs.TrainConfig:
  """The preset named by --config with every given flag applied."""
  names = flag_values.tasks
  if names is not None:
    names = [n.strip() for n in names if n.strip()]
    if not names:
      raise configs.ConfigError('--tasks is empty.')
    known = tasks_lib.task_names()
    for n in names:
      if n not in known:
        raise configs.ConfigError(f'--tasks: unknown task {n!r}; known tasks: '
                                  f'{", ".join(known)}.')
    if len(set(names)) != len(names):
      raise configs.ConfigError(f'--tasks lists a task twice: {",".join(names)}.')
  config = configs.PRESETS[flag_values.config](names)
  config = dataclasses.replace(
      config, **_given(flag_values, '', configs.TrainConfig))
  for task in tasks_lib.task_names():
    given = [n for n in flag_values if n.startswith(f'{task}_')
             and flag_values[n].present]
    if task not in config.tasks:
      if given:
        raise configs.ConfigError(
            f'--{given[0]} is set but {task} is not among --tasks '
            f'({",".join(config.tasks)}).')
      continue
    run = config.tasks[task]
    run_updates = _given(flag_values, f'{task}_', configs.TaskRun)
    task_updates = _given(flag_values, f'{task}_', type(run.config))
    config.tasks[task] = dataclasses.replace(
        run, config=dataclasses.replace(run.config, **task_updates),
        **run_updates)
  config.validate()
  return config


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    print('Pass --helpfull to see every flag.', file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _cluster_from_flags(config):
  """(resolver, plan) for a cluster run, or (None, None) on one machine."""
  plan = None
  if _TASK_WORKERS.value:
    plan = distributed.ClusterPlan.from_strings(
        config, _TASK_WORKERS.value, _TASK_STEPS.value, _TASK_DELAY.value)
  resolver = distributed.make_cluster_resolver(
      _CLUSTER_RESOLVER.value, plan_workers=plan.num_workers if plan else None,
      slurm_port_base=_SLURM_PORT_BASE.value)
  if resolver is None:
    given = [f'--{f.name}' for f in (_TASK_WORKERS, _TASK_STEPS, _TASK_DELAY)
             if f.value]
    if given:
      raise configs.ConfigError(
          f'{", ".join(given)} need a cluster (TF_CONFIG describing one, or '
          f'--cluster_resolver=slurm).')
    return None, None
  workers = len(distributed.cluster_dict(resolver).get(distributed.JOB_WORKER,
                                                       []))
  if plan is None:
    distributed.ClusterPlan.from_strings(config, None, num_workers=workers)
  plan.validate_cluster(distributed.cluster_dict(resolver))
  return resolver, plan


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return EXIT_USAGE
  from mtssl.training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  try:
    config = config_from_flags()
    resolver, plan = _cluster_from_flags(config)
    if resolver is not None and resolver.task_type != distributed.JOB_CHIEF:
      distributed.run_server(resolver, config, plan,
                             exit_when_done=_CLUSTER_RESOLVER.value == 'slurm')
      return 0
    if resolver is not None:
      trainer = distributed.DistributedTrainer(config, plan, resolver)
      logging.info('Cluster run: %s', plan.task_workers)
    else:
      trainer = trainer_lib.Trainer(config)
    logging.info('Tasks %s, trunk %s at output stride %d, model_dir %s',
                 ','.join(config.tasks), config.trunk, config.output_stride,
                 config.model_dir)
    trainer.setup()
  except (configs.ConfigError, sources_lib.DataSourceError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except distributed.ClusterError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_CLUSTER

  received = []

  def _on_signal(signum, frame):
    del frame
    received.append(signum)
    trainer.request_stop()

  signal.signal(signal.SIGTERM, _on_signal)
  signal.signal(signal.SIGINT, _on_signal)
  try:
    result = trainer.train()
  except trainer_lib.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_NONFINITE
  except configs.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except distributed.ClusterError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_CLUSTER
  print(f'Checkpoint: {result["checkpoint"]}')
  print(f'Per-task steps: {result["task_steps"]}')
  print(f'TensorBoard: tensorboard --logdir {config.model_dir}')
  if received:
    return 128 + received[0]
  return 0


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
