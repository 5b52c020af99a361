"""The cluster of a parameter-server run: which worker trains which task,
and where the processes are (TF_CONFIG or Slurm)."""

import dataclasses
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from mtssl.configs import training as configs

JOB_CHIEF = 'chief'
JOB_PS = 'ps'
JOB_WORKER = 'worker'
RESOLVERS = ('auto', 'tfconfig', 'slurm')
# Written by the coordinator at the end of a run (the train() result).
RESULT_FILE = 'distributed_result.json'
PY_FUNCTION_PREFIX = 'mtssl-input'


class ClusterError(RuntimeError):
  """The cluster failed in a way training cannot survive (a lost ps)."""


# Cluster description ---------------------------------------------------------
def parse_task_values(text: str, flag: str, kind, names) -> Dict[str, object]:
  """'rp:4,col:2' -> {'rp': 4, 'col': 2}; ConfigError names `flag`."""
  values = {}
  for item in (text or '').split(','):
    item = item.strip()
    if not item:
      continue
    name, sep, value = item.partition(':')
    name = name.strip()
    if not sep or not name:
      raise configs.ConfigError(f'--{flag}: expected task:value items like '
                                f'rp:2,col:1, got {item!r}.')
    if name not in names:
      raise configs.ConfigError(f'--{flag}: {name!r} is not among --tasks '
                                f'({",".join(names)}).')
    if name in values:
      raise configs.ConfigError(f'--{flag}: {name} is given twice.')
    try:
      values[name] = kind(value)
    except ValueError:
      what = {'int': 'an integer', 'float': 'a number'}[kind.__name__]
      raise configs.ConfigError(f'--{flag}: {name}:{value} is not '
                                f'{what}.') from None
  return values


@dataclasses.dataclass
class ClusterPlan:
  """Which worker trains which task, and per-task limits.

  task_workers: workers per task, in task order; worker indices are assigned
    in that order (the first task's ranks 0..K-1 are workers 0..K-1, ...).
  task_steps: stop a task after this many applied rounds (optional).
  """
  task_workers: Dict[str, int]
  task_steps: Dict[str, int] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_strings(cls, config: configs.TrainConfig, task_workers: str,
                   task_steps: Optional[str] = None,
                   num_workers: Optional[int] = None) -> 'ClusterPlan':
    names = list(config.tasks)
    if not task_workers:
      example = ','.join(f'{n}:1' for n in names)
      raise configs.ConfigError(
          f'--task_workers is required on a cluster: how many workers train '
          f'each task, e.g. --task_workers={example}'
          + (f' (the cluster has {num_workers} workers).' if num_workers
             else '.'))
    workers = parse_task_values(task_workers, 'task_workers', int, names)
    missing = [n for n in names if n not in workers]
    if missing:
      raise configs.ConfigError(
          f'--task_workers gives no workers to {", ".join(missing)}; every '
          f'task in --tasks needs at least one.')
    for name, count in workers.items():
      if count < 1:
        raise configs.ConfigError(f'--task_workers: {name} needs at least one '
                                  f'worker, got {count}.')
    steps = parse_task_values(task_steps, 'task_steps', int, names)
    for name, count in steps.items():
      if count < 0:
        raise configs.ConfigError(f'--task_steps: {name}:{count} is negative.')
    plan = cls({n: workers[n] for n in names}, steps)
    if num_workers is not None:
      plan.check_worker_count(num_workers)
    return plan

  @property
  def names(self) -> List[str]:
    return list(self.task_workers)

  @property
  def num_workers(self) -> int:
    return sum(self.task_workers.values())

  def assignments(self) -> List[Tuple[str, int]]:
    """(task, rank) of every worker index."""
    return [(name, rank) for name, count in self.task_workers.items()
            for rank in range(count)]

  def workers_of(self, name) -> List[int]:
    return [w for w, (t, _) in enumerate(self.assignments()) if t == name]

  def check_worker_count(self, num_workers):
    if num_workers != self.num_workers:
      groups = ' + '.join(f'{n} {k}' for n, k in self.task_workers.items())
      raise configs.ConfigError(
          f'--task_workers assigns {self.num_workers} workers ({groups}) but '
          f'the cluster has {num_workers} workers; the counts must match.')

  def validate_cluster(self, cluster: Dict[str, list]):
    """Checks a cluster spec dict (job -> addresses) against this plan."""
    unknown = sorted(set(cluster) - {JOB_CHIEF, JOB_PS, JOB_WORKER})
    if unknown:
      raise configs.ConfigError(
          f'cluster: jobs {unknown} are not supported; a cluster has one '
          f'{JOB_CHIEF} (the coordinator), {JOB_PS} and {JOB_WORKER} jobs.')
    if len(cluster.get(JOB_CHIEF, [])) != 1:
      raise configs.ConfigError(
          f'cluster: needs exactly one {JOB_CHIEF} (the coordinator), has '
          f'{len(cluster.get(JOB_CHIEF, []))}.')
    if not cluster.get(JOB_PS):
      raise configs.ConfigError('cluster: needs at least one ps.')
    self.check_worker_count(len(cluster.get(JOB_WORKER, [])))


# Cluster resolvers -----------------------------------------------------------
def _tf_config(environ) -> dict:
  text = environ.get('TF_CONFIG', '')
  if not text.strip():
    return {}
  try:
    value = json.loads(text)
  except ValueError as e:
    raise configs.ConfigError(f'TF_CONFIG is not valid JSON: {e}') from None
  if not isinstance(value, dict):
    raise configs.ConfigError('TF_CONFIG must be a JSON object with "cluster" '
                              'and "task".')
  return value


def _slurm_tasks_per_node(environ):
  from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  value = environ.get('SLURM_STEP_TASKS_PER_NODE')
  if not value:
    raise configs.ConfigError('--cluster_resolver=slurm: SLURM_STEP_TASKS_PER_'
                              'NODE is not set; run the job steps with srun.')
  return slurm_cluster_resolver.expand_tasks_per_node(value)


def make_cluster_resolver(kind: str, plan_workers: Optional[int] = None,
                          slurm_port_base: int = 8888, environ=None):
  """The cluster resolver for --cluster_resolver, or None for one machine.

  'auto' uses TF_CONFIG when it describes a cluster. 'slurm' builds the
  cluster from the Slurm step: rank 0 is the coordinator, then the parameter
  servers, then `plan_workers` workers (the sum of --task_workers); every
  other Slurm task is a parameter server.
  """
  environ = os.environ if environ is None else environ
  if kind not in RESOLVERS:
    raise configs.ConfigError(f'--cluster_resolver must be one of {RESOLVERS},'
                              f' got {kind!r}.')
  if kind == 'auto':
    kind = 'tfconfig' if _tf_config(environ).get('cluster') else None
    if kind is None:
      return None
  if kind == 'tfconfig':
    tf_config = _tf_config(environ)
    if not tf_config.get('cluster'):
      raise configs.ConfigError('--cluster_resolver=tfconfig: TF_CONFIG has no '
                                '"cluster".')
    task = tf_config.get('task') or {}
    if task.get('type') not in (JOB_CHIEF, JOB_PS, JOB_WORKER):
      raise configs.ConfigError(
          f'TF_CONFIG task type must be one of {JOB_CHIEF}, {JOB_PS}, '
          f'{JOB_WORKER}; got {task.get("type")!r}.')
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(tf_config['cluster']), task_type=task['type'],
        task_id=int(task.get('index', 0)),
        rpc_layer=tf_config.get('rpc_layer') or 'grpc')
  # Slurm.
  from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  for var in ('SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_STEP_NODELIST'):
    if var not in environ:
      raise configs.ConfigError(f'--cluster_resolver=slurm: {var} is not set; '
                                f'start every process with srun.')
  if plan_workers is None:
    raise configs.ConfigError('--cluster_resolver=slurm needs --task_workers.')
  num_tasks = int(environ['SLURM_STEP_NUM_TASKS'])
  num_ps = num_tasks - 1 - plan_workers
  if num_ps < 1:
    raise configs.ConfigError(
        f'--cluster_resolver=slurm: the step has {num_tasks} tasks; one '
        f'coordinator and {plan_workers} workers (--task_workers) leave '
        f'{num_ps} for parameter servers, at least 1 is needed.')
  per_node = _slurm_tasks_per_node(environ)
  saved = {k: os.environ.get(k) for k in environ if k.startswith('SLURM_')}
  os.environ.update({k: v for k, v in environ.items() if k.startswith('SLURM_')})
  try:
    # CPU-only nodes: one pseudo-device per task, so that every task of a
    # node gets its own port; GPUs are left to the user's CUDA_VISIBLE_DEVICES.
    resolver = slurm_cluster_resolver.SlurmClusterResolver(
        jobs={JOB_CHIEF: 1, JOB_PS: num_ps, JOB_WORKER: plan_workers},
        port_base=slurm_port_base, gpus_per_node=max(per_node),
        gpus_per_task=1, auto_set_gpu=False)
    resolver.cluster_spec()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return resolver


def cluster_dict(resolver) -> Dict[str, list]:
  spec = resolver.cluster_spec().as_dict()
  return {job: list(tasks.values()) if isinstance(tasks, dict) else list(tasks)
          for job, tasks in spec.items()}



def explain_failure(e, plan: 'ClusterPlan', cluster: Dict[str, list],
                    latest_checkpoint: Optional[str]):
  """A clear exception for an error that ends a cluster run, or None."""
  text = str(e)
  missing = re.search(r'Could not find callback with key=(' +
                      re.escape(PY_FUNCTION_PREFIX) + r'/([^/\s]+)/(\d+)/[^\s]*)',
                      text)
  if missing:
    name, rank = missing.group(2), int(missing.group(3))
    worker = plan.workers_of(name)[rank] if name in plan.task_workers else '?'
    return configs.ConfigError(
        f'worker {worker} has not registered the input pipeline of {name} '
        f'rank {rank} ({missing.group(1)}): start every worker with '
        f'`python -m mtssl.train` and the same flags as the coordinator '
        f'(its data flags, seed or code differ).')
  ps = set(re.findall(r'/job:ps/replica:0/task:(\d+)', text))
  for index, address in enumerate(cluster.get(JOB_PS, [])):
    port = address.rsplit(':', 1)[-1]
    if re.search(rf'({re.escape(address)}|localhost:{port}|'
                 rf'127\.0\.0\.1:{port})\b', text):
      ps.add(str(index))
  ps = sorted(ps, key=int)
  # TensorFlow's own classification (cluster_coordinator._is_ps_failure),
  # plus errors of the coordinator's direct calls, which name an address.
  lost = isinstance(e, (tf.errors.UnavailableError, tf.errors.AbortedError,
                        tf.errors.DeadlineExceededError)) or (
                            isinstance(e, tf.errors.InvalidArgumentError) and
                            ('unknown device' in text.lower() or
                             'Unable to find the relevant tensor '
                             'remote_handle' in text))
  if lost and (ps or type(e).__name__ == 'PSUnavailableError'):
    which = ', '.join(f'/job:ps/task:{i}' for i in ps) or 'a parameter server'
    reason = re.search(r'grpc_message:\s*"([^"]+)"', text)
    first = reason.group(1) if reason else type(e).__name__
    return ClusterError(
        f'Lost {which} ({first[:160]}). Training stops; the last checkpoint '
        f'is {latest_checkpoint}. Restart the parameter server(s), then the '
        f'coordinator with the same flags: it resumes from that checkpoint.')
  return None
