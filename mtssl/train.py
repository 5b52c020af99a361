"""Multi-task self-supervised pre-training: `python -m mtssl.train`.

    python -m mtssl.train                          # CPU preset, rp+col
    python -m mtssl.train --config=paper --tasks=rp,col,ex,ms
    python -m mtssl.train --flagfile=flags/rp_col.flags --model_dir=/runs/rp_col

Flags are generated from mtssl.configs.training; on a cluster the same
command runs in every process (mtssl/training/cluster/). Flags, exit
statuses and cluster use: README, "Training" and "Training on a cluster".
"""

import dataclasses
import os
import signal
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from mtssl.utils import devices  # pylint: disable=g-import-not-at-top,wrong-import-position

devices.initialize_quietly()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging

from mtssl.configs import base as config_base  # pylint: disable=wrong-import-position
from mtssl.configs import training as configs
from mtssl import tasks as tasks_lib
from mtssl.data import sources as sources_lib
from mtssl.training.cluster import plan as cluster_plan

FLAGS = flags.FLAGS
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_CLUSTER = 4

_CONFIG = flags.DEFINE_enum('config', 'cpu', sorted(configs.PRESETS),
                            'preset every other flag overrides (mtssl/configs/training.py)')
_TASKS = flags.DEFINE_list('tasks', None,
                           'tasks to train jointly, any of '
                           + ', '.join(tasks_lib.task_names())
                           + ' (default: the preset\'s)')
_CLUSTER_RESOLVER = flags.DEFINE_enum(
    'cluster_resolver', 'auto', cluster_plan.RESOLVERS,
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
_SLURM_PORT_BASE = flags.DEFINE_integer(
    'slurm_port_base', 8888, 'cluster: first port of the servers of each node '
    'under --cluster_resolver=slurm')


def _define_flags():
  default_run = configs.cpu_config(tasks_lib.task_names())
  config_base.define_flags(configs.TrainConfig, defaults=default_run)
  for task in tasks_lib.task_names():
    run = default_run.tasks[task]
    config_base.define_flags(configs.TaskRun, prefix=f'{task}_',
                             help_prefix=f'{task}: ', defaults=run)
    config_base.define_flags(type(run.config), prefix=f'{task}_',
                             help_prefix=f'{task}: ', defaults=run.config)


_define_flags()


def _has_gpu() -> bool:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return bool(tf.config.list_physical_devices('GPU'))


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
  config = configs.PRESETS[flag_values.config](names, gpu=_has_gpu())
  config = dataclasses.replace(
      config, **config_base.given_values(flag_values, '', configs.TrainConfig))
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
    run_updates = config_base.given_values(flag_values, f'{task}_',
                                             configs.TaskRun)
    task_updates = config_base.given_values(flag_values, f'{task}_',
                                              type(run.config))
    config.tasks[task] = dataclasses.replace(
        run, config=dataclasses.replace(run.config, **task_updates),
        **run_updates)
  config.validate()
  return config


def _cluster_from_flags(config):
  """(resolver, plan) for a cluster run, or (None, None) on one machine."""
  plan = None
  if _TASK_WORKERS.value:
    plan = cluster_plan.ClusterPlan.from_strings(
        config, _TASK_WORKERS.value, _TASK_STEPS.value)
  resolver = cluster_plan.make_cluster_resolver(
      _CLUSTER_RESOLVER.value, plan_workers=plan.num_workers if plan else None,
      slurm_port_base=_SLURM_PORT_BASE.value)
  if resolver is None:
    given = [f'--{f.name}' for f in (_TASK_WORKERS, _TASK_STEPS)
             if f.value]
    if given:
      raise configs.ConfigError(
          f'{", ".join(given)} need a cluster (TF_CONFIG describing one, or '
          f'--cluster_resolver=slurm).')
    return None, None
  workers = len(cluster_plan.cluster_dict(resolver).get(cluster_plan.JOB_WORKER,
                                                       []))
  if plan is None:
    cluster_plan.ClusterPlan.from_strings(config, None, num_workers=workers)
  plan.validate_cluster(cluster_plan.cluster_dict(resolver))
  return resolver, plan


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return EXIT_USAGE
  from mtssl.training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  try:
    config = config_from_flags()
    resolver, plan = _cluster_from_flags(config)
    if resolver is not None and resolver.task_type != cluster_plan.JOB_CHIEF:
      from mtssl.training.cluster import worker  # pylint: disable=g-import-not-at-top
      worker.run_server(resolver, config, plan,
                             exit_when_done=_CLUSTER_RESOLVER.value == 'slurm')
      return 0
    if resolver is not None:
      from mtssl.training.cluster import coordinator  # pylint: disable=g-import-not-at-top
      trainer = coordinator.DistributedTrainer(config, plan, resolver)
      logging.info('Cluster run: %s', plan.task_workers)
    else:
      trainer = trainer_lib.Trainer(config)
    on_device = [n for n, r in config.tasks.items()
                 if getattr(r.config, 'device_preprocessing', False)]
    logging.info(
        'Tasks %s (batch %s), trunk %s at output stride %d, precision %s, '
        'XLA %s, atrous %s, preprocessing in the step for %s, on %s; '
        'model_dir %s', ','.join(config.tasks),
        ','.join(str(r.config.batch_size) for r in config.tasks.values()),
        config.trunk, config.output_stride, config.mixed_precision,
        'on' if config.xla else 'off',
        'native' if config.native_atrous else 'space-to-batch',
        ','.join(on_device) or 'none', 'GPU' if _has_gpu() else 'CPU',
        config.model_dir)
    trainer.setup()
  except (configs.ConfigError, sources_lib.DataSourceError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except cluster_plan.ClusterError as e:
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
  except (configs.ConfigError, sources_lib.DataSourceError) as e:
    # Includes a checkpoint that cannot be written (disk full, read-only)
    # and a data source that stopped yielding usable data.
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except cluster_plan.ClusterError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_CLUSTER
  print(f'Checkpoint: {result["checkpoint"]}')
  print(f'Per-task steps: {result["task_steps"]}')
  print(f'TensorBoard: tensorboard --logdir {config.model_dir}')
  if received:
    return 128 + received[0]
  return 0


def run():
  app.run(main, flags_parser=config_base.parse_command_line)


if __name__ == '__main__':
  run()
