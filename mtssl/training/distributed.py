r"""Distributed training on a ParameterServerStrategy cluster (paper section 4).

The paper's setup (Figure 2, SPEC section 5): every worker trains exactly one
task; the trunk lives on parameter servers and is shared by all workers; a
task's head is shared only by that task's workers; the gradients of one
task's worker group are accumulated synchronously and applied, with that
task's own RMSProp, as soon as the group is complete, without waiting for the
other tasks. This module runs that setup on TensorFlow's own
`tf.distribute.ParameterServerStrategy` (PSS) and `ClusterCoordinator`: there
is no other transport.

Cluster: one coordinator (job `chief`), P parameter servers (`ps`), W workers
(`worker`), described by TF_CONFIG or a Slurm allocation. `--task_workers=
rp:4,col:2,...` splits the workers into groups, in the order of `--tasks`:
with `--tasks=rp,col --task_workers=rp:2,col:1`, workers 0 and 1 are rp's
ranks 0 and 1 and worker 2 is col's rank 0. Every process runs the same
command (`python -m mtssl.train` with the same flags); TF_CONFIG's task type
picks its role.

Design
------
* Variables. Trunk, heads, lasso alphas, every task's TF1 RMSProp slots and
  the run state are created by the coordinator under the strategy's scope,
  so they live on the parameter servers. For every task t with K_t workers
  and every variable v it trains, an accumulator of shape [K_t] + v.shape is
  colocated with v (`strategy.extended.colocate_vars_with`): row r holds
  rank r's gradient for the task's current round. A per-task int64 vector of
  K_t tags says which round each row belongs to. The round counter of task t
  is its step counter in the run state.
* Work closures. The coordinator schedules one kind of closure, `work`, and
  keeps one outstanding per active worker. ClusterCoordinator.schedule cannot
  pin a closure to a worker, so a closure is routed *inside* the function:
  `experimental_get_current_worker_index()` selects, through a static table,
  the worker's task and rank, and a `tf.switch_case` runs that task's branch:
    1. read the round n; if the rank's row already holds round n, wait
       in-graph (polling the round every 20 ms, at most 5 s) for the round to
       advance;
    2. take the next batch of the worker's own input pipeline, compute the
       task's loss and gradients (trunk, its head, its alpha);
    3. write the gradients into row `rank` of the accumulators, then tag the
       row with n (an overwrite, so a closure that runs twice, which PSS
       allows when a worker is preempted, cannot count twice);
    4. return (task, rank, round, status, loss, stream position, time).
  A non-finite loss or gradient writes nothing and puts back the batch-norm
  moving statistics the forward pass moved, as on one machine; the worker
  tries its next batch.
* Applying. The coordinator is the only process that applies updates, like
  the chief of TF1's SyncReplicasOptimizer. When it has seen all K_t ranks of
  task t report round n (a returned contribution, or a wait on round n, which
  proves the row holds round n), it runs the task's apply function itself:
  under `strategy.run`, the mean of each accumulator (computed on the
  accumulator's parameter server) goes to the task's own optimizer, whose
  updates run where the variables live; then, ordered after the updates, the
  task's round (step counter) is incremented, which releases the task's
  waiting workers. Because one thread applies, a round is applied exactly
  once, and a checkpoint taken between applications is consistent across
  tasks (every task at a round boundary).
* Inputs. A per-worker dataset per task (`create_per_worker_dataset`) holds,
  on each worker of the task, that rank's stream (seeded by task and rank, so
  rank 0 reads the single-machine stream, starting at the rank's
  checkpointed position), and an empty dataset on every other worker: only
  the worker's own task's pipeline ever runs on it. TensorFlow places
  `tf.numpy_function` / `tf.py_function` ops on the process that defined
  them, which under PSS is the coordinator: every image would be decoded
  there. The pipelines are therefore built with their Python functions left
  unplaced and registered under deterministic names (task, rank and a
  fingerprint of the data settings), and every worker process, started with
  the same flags, registers the same functions for its own task and rank
  before it serves. Decoding then runs on the worker that trains on the
  batch. A worker started with other data flags fails the first step with a
  message saying so.
* Checkpoints are written by the coordinator every `checkpoint_every`
  applied rounds (counted over all tasks) and at the end, with the
  single-machine layout (`backbone`, `heads`, `lasso`, `optimizers`,
  `state`) plus `distributed`: per-rank stream positions and per-task worker
  steps (for the compute accounting, which charges every worker step).
  Accumulators are not saved: a restart recomputes the unfinished rounds.

Faults
------
* A worker that dies: PSS moves its in-flight closure to another worker
  (where it computes that worker's task) and re-creates the worker's
  datasets when it comes back; the other tasks keep training. Its own task
  waits for it, as SyncReplicasOptimizer with `replicas_to_aggregate` equal
  to the group size does: rounds are neither lost nor applied twice. The
  worker must be restarted by the cluster manager (Kubernetes restart policy,
  Slurm requeue, `tools/launch_local_cluster.py`). A restarted worker's
  stream restarts from the position its rank had when the coordinator
  started (a replay bounded by that rank's steps since then).
* A lost parameter server ends the run with ClusterError naming it; restart
  the parameter server and the coordinator: it resumes from the last
  checkpoint.
* A restarted coordinator reconnects to the running servers, rebuilds the
  variables and resumes from the last checkpoint: per-task step counts,
  optimizer state and stream positions come back; unfinished rounds are
  recomputed.
* Bounded deviation: a worker declared failed while it is in fact still
  running (a network partition, not a crash) may later overwrite its row
  with a gradient one round old; and it is not known which rows a worker
  that dies in the middle of writing had written, so its rank's row is
  rewritten in full by the next closure.

Differences from the original TF1 setup, and why
------------------------------------------------
* TF1 used between-graph replication: each worker ran its own client and
  SyncReplicasOptimizer (one ConditionalAccumulator per variable, a token
  queue that blocks workers, the chief worker applying). TF2 has no
  between-graph replication; PSS has one client, the coordinator, which
  therefore plays the chief. Accumulators are one row per worker instead of a
  running sum so that re-executed closures are idempotent (PSS executes a
  closure at least once); the parameter-server memory for task t is K_t
  copies of the trunk and its head (the paper's 16 workers per task and a
  ResNet-101 block-3 trunk: about 2-4 GB per task, spread like the
  variables).
* Stale gradients: SyncReplicasOptimizer drops gradients computed on an old
  step; here a worker never computes on an old round of its own task
  (it waits), so nothing is dropped. Updates of other tasks may land during
  a worker's forward pass, as in the paper's asynchronous-across-tasks
  design.
* Batch-norm moving statistics are updated by each worker's forward pass
  directly, as TF1 workers ran their UPDATE_OPS.
* The schedule flags of the single-machine trainer (`--schedule`,
  `--<task>_weight`) do not apply: each task advances as fast as its worker
  group. `--steps` counts applied rounds over all tasks, `--task_steps` stops
  single tasks, `--max_cost` is the total over tasks of worker steps x step
  cost.
"""

import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import queue
import re
import threading
import time
from typing import Dict, List, Optional, Tuple

import tensorflow as tf
from absl import logging
# Private TensorFlow modules, each used for one documented purpose:
# script_ops._py_funcs names the Python functions of input pipelines
# deterministically (see `worker_local_python_functions`), context gives the
# device they are placed on, and data testing.sleep is tf.data's sleep
# transformation (the in-graph poll interval and --task_delay).
from tensorflow.python.data.experimental.ops import testing as tf_data_testing  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.eager import context as tf_context  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import script_ops  # pylint: disable=g-direct-tensorflow-import

from mtssl import configs
from mtssl import io_utils
from mtssl.training import trainer as trainer_lib

JOB_CHIEF = 'chief'
JOB_PS = 'ps'
JOB_WORKER = 'worker'
RESOLVERS = ('auto', 'tfconfig', 'slurm')

# Status of a work closure.
CONTRIBUTED, WAITING, IDLE, NONFINITE = 0, 1, 2, 3

POLL_SECONDS = 0.02        # in-graph poll interval of a waiting worker
MAX_WAIT_SECONDS = 5.0     # longest a closure waits before reporting back
PY_FUNCTION_PREFIX = 'mtssl-input'
# Written by the coordinator at the end of a run (the train() result).
RESULT_FILE = 'distributed_result.json'


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
  task_delay: testing aid, seconds added to every step of a task's workers.
  """
  task_workers: Dict[str, int]
  task_steps: Dict[str, int] = dataclasses.field(default_factory=dict)
  task_delay: Dict[str, float] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_strings(cls, config: configs.TrainConfig, task_workers: str,
                   task_steps: Optional[str] = None,
                   task_delay: Optional[str] = None,
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
    delay = parse_task_values(task_delay, 'task_delay', float, names)
    for name, seconds in delay.items():
      if not 0 <= seconds <= 3600:
        raise configs.ConfigError(f'--task_delay: {name}:{seconds} must be '
                                  f'between 0 and 3600 seconds.')
    plan = cls({n: workers[n] for n in names}, steps, delay)
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


# Worker-local Python functions -----------------------------------------------
_REGISTRY_LOCK = threading.Lock()


@contextlib.contextmanager
def worker_local_python_functions(prefix: str):
  """Python functions of pipelines built inside run where they execute.

  TensorFlow names a `tf.numpy_function` / `tf.py_function` by a process-wide
  counter and pins it to the process that created it (the coordinator under
  PSS). Inside this block they are instead named `<prefix>/<i>` (i counting
  within the block) and left unplaced, so that a worker process that built
  the same pipeline under the same prefix runs them itself.
  """
  registry = script_ops._py_funcs  # pylint: disable=protected-access
  ctx = tf_context.context()
  counter = itertools.count()
  with _REGISTRY_LOCK:
    registry._next_unique_token = lambda: f'{prefix}/{next(counter)}'  # pylint: disable=protected-access
    ctx.host_address_space = lambda: ''
    try:
      yield
    finally:
      del registry._next_unique_token  # pylint: disable=protected-access
      del ctx.host_address_space


def rank_seed(seed: int, name: str, rank: int) -> int:
  """The data seed of rank `rank` of task `name` (rank 0: the task's seed)."""
  base = trainer_lib.task_seed(seed, name)
  if rank == 0:
    return base
  return (base ^ ((rank * 0x9E3779B1) & 0x7FFFFFFF)) & 0x7FFFFFFF


def input_prefix(config: configs.TrainConfig, name: str, rank: int) -> str:
  """Name prefix of the Python functions of one rank's input pipeline."""
  run = config.tasks[name]
  key = repr((name, rank, rank_seed(config.seed, name, rank), run.data,
              run.config, config.tfds_data_dir, config.harmonize))
  digest = hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]
  return f'{PY_FUNCTION_PREFIX}/{name}/{rank}/{digest}'


def rank_pipeline(config, task, source, name, rank, start):
  """Rank `rank`'s batched stream of task `name`, from position `start`."""
  with worker_local_python_functions(input_prefix(config, name, rank)):
    return task.make_dataset(source, config.tasks[name].config.batch_size,
                             seed=rank_seed(config.seed, name, rank),
                             start=start)


def register_worker_inputs(config, name, rank):
  """Registers, in this worker process, rank `rank`'s pipeline of `name`.

  Returns what must stay alive while the worker serves: the traced pipeline
  (which holds its Python functions) and the source (whose skip counter the
  pipeline updates).
  """
  tasks = trainer_lib.make_tasks(config)
  task = tasks[name]
  source = trainer_lib.make_sources(config, {name: task})[name]

  def build():
    return rank_pipeline(config, task, source, name, rank, start=0)

  # Traced like the coordinator's dataset function, so that the same
  # functions are created in the same order.
  concrete = tf.function(build).get_concrete_function()
  return concrete, source


def _result_written_since(model_dir, since):
  path = os.path.join(model_dir, RESULT_FILE)
  try:
    return tf.io.gfile.stat(path).mtime_nsec / 1e9 >= since
  except tf.errors.NotFoundError:
    return False


def run_server(resolver, config: configs.TrainConfig, plan: ClusterPlan,
               exit_when_done: bool = False):
  """A parameter server or worker process: serves until it is killed.

  With `exit_when_done` (Slurm, where nothing else ends the servers) it
  exits once the coordinator has written the run's result file.
  """
  started = time.time()
  job, index = resolver.task_type, int(resolver.task_id)
  cluster = cluster_dict(resolver)
  plan.validate_cluster(cluster)
  source = None
  if job == JOB_WORKER:
    name, rank = plan.assignments()[index]
    keep_alive = register_worker_inputs(config, name, rank)
    source = keep_alive[1]
    logging.info('Worker %d: task %s, rank %d (%s).', index, name, rank,
                 input_prefix(config, name, rank))
  server = tf.distribute.Server(
      tf.train.ClusterSpec(cluster), job_name=job, task_index=index,
      protocol=resolver.rpc_layer or 'grpc', start=True)
  logging.info('Serving as %s %d at %s.', job, index, cluster[job][index])
  last_report = time.time()
  while True:
    time.sleep(5)
    if source is not None and time.time() - last_report > 300:
      last_report = time.time()
      problems = source.counter.problems()
      if problems:
        logging.info('Data problems so far on this worker: %s', problems)
    if exit_when_done and _result_written_since(config.model_dir, started):
      logging.info('The run is finished (%s written); exiting.', RESULT_FILE)
      logging.flush()
      os._exit(0)  # pylint: disable=protected-access
  del server


# Coordinator -------------------------------------------------------------------
class DistributedState(tf.Module):
  """Distributed-only counters saved with every checkpoint."""

  def __init__(self, plan: ClusterPlan):
    super().__init__(name='distributed_state')
    # Next stream position of every rank, and applied worker steps per task.
    self.positions = {n: {str(r): tf.Variable(0, dtype=tf.int64,
                                              trainable=False)
                          for r in range(k)}
                      for n, k in plan.task_workers.items()}
    self.worker_steps = {n: tf.Variable(0, dtype=tf.int64, trainable=False)
                         for n in plan.task_workers}


def _sleep_dataset(dataset, seconds):
  return dataset.apply(tf_data_testing.sleep(int(round(seconds * 1e6))))


class DistributedTrainer(trainer_lib.Trainer):
  """Trains a TrainConfig on a PSS cluster, one worker group per task."""

  def __init__(self, config: configs.TrainConfig, plan: ClusterPlan, resolver):
    super().__init__(config)
    if list(plan.task_workers) != self.names:
      raise configs.ConfigError(
          f'--task_workers lists {",".join(plan.task_workers)}, --tasks '
          f'{",".join(self.names)}: they must name the same tasks.')
    self.plan = plan
    self.resolver = resolver
    plan.validate_cluster(cluster_dict(resolver))
    self.strategy = None
    if config.xla:
      logging.warning('--xla is not used on a cluster: the work function '
                      'reads its input iterators and is not compiled.')
    if config.native_atrous:
      logging.warning('--native_atrous on a cluster needs GPU workers: the '
                      'work function is not XLA-compiled, and TensorFlow\'s '
                      'CPU kernels have no gradient for dilated Conv2D ops.')

  # Set-up -----------------------------------------------------------------
  @contextlib.contextmanager
  def _explained_failures(self):
    """Re-raises a lost ps or an unregistered worker as a clear error."""
    try:
      yield
    except tf.errors.OpError as e:
      failure = self._cluster_failure(e)
      if failure is None:
        raise
      raise failure from e

  def setup(self):
    with self._explained_failures():
      return self._setup()

  def _setup(self):
    if self.model is not None:
      return self
    cfg = self.config
    self._prepare()
    logging.info('Connecting to the cluster: %s', cluster_dict(self.resolver))
    self.strategy = tf.distribute.ParameterServerStrategy(self.resolver)
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(
        self.strategy)
    t0 = time.time()
    with self._precision_policy(), self.strategy.scope():
      self.dstate = DistributedState(self.plan)
      restore_status = self._create_model_and_state(
          extra_checkpoint_items={'distributed': self.dstate})
      self._make_inputs()
      self.model.build_all({n: self._zero_features(n) for n in self.names})
      self._restore_or_initialize(restore_status)
      self._make_steps(restore_status)
      self._make_accumulators()
    logging.info('Built the model and its state on the parameter servers in '
                 '%.1f s.', time.time() - t0)
    self.writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir,
                                                             'train'))
    self._work = tf.function(self._work_fn)
    self._apply = {n: tf.function(functools.partial(self._apply_fn, n))
                   for n in self.names}
    return self

  def _make_inputs(self):
    plan = self.plan
    assignments = plan.assignments()
    self._task_table = tf.constant(
        [self.names.index(t) for t, _ in assignments], tf.int32)
    self.per_worker_datasets = {}
    self.iterators = {}
    for name in self.names:
      ranks = [r if t == name else -1 for t, r in assignments]
      positions = [int(self.dstate.positions[name][str(r)].numpy())
                   for r in range(plan.task_workers[name])]
      fn = functools.partial(self._dataset_fn, name, tf.constant(ranks, tf.int64),
                             positions)
      self.per_worker_datasets[name] = self.coordinator.create_per_worker_dataset(fn)
      self.iterators[name] = iter(self.per_worker_datasets[name])

    def tick_fn():
      ds = _sleep_dataset(tf.data.Dataset.from_tensors(tf.constant(0)).repeat(),
                          POLL_SECONDS)
      options = tf.data.Options()
      options.autotune.enabled = False
      options.experimental_optimization.inject_prefetch = False
      return ds.with_options(options)

    self._ticks = iter(self.coordinator.create_per_worker_dataset(tick_fn))

  def _dataset_fn(self, name, ranks, positions):
    """Task `name`'s stream on the worker running this; empty off its group."""
    worker = tf.distribute.coordinator.experimental_get_current_worker_index()
    rank = tf.gather(ranks, worker)
    pipelines = [rank_pipeline(self.config, self.tasks[name],
                               self.sources[name], name, r, start)
                 for r, start in enumerate(positions)]
    if len(pipelines) == 1:
      ds = pipelines[0]
    else:
      choice = tf.data.Dataset.from_tensors(tf.maximum(rank, 0)).repeat()
      ds = tf.data.Dataset.choose_from_datasets(pipelines, choice)
    delay = self.plan.task_delay.get(name)
    if delay:
      ds = _sleep_dataset(ds, delay)
    return ds.take(tf.where(rank >= 0, tf.constant(-1, tf.int64),
                            tf.constant(0, tf.int64)))

  def _zero_features(self, name):
    features, _ = self.per_worker_datasets[name].element_spec

    def zeros(spec):
      shape = [1 if d is None else d for d in spec.shape.as_list()]
      if spec.dtype == tf.string:
        return tf.fill(shape, '')
      return tf.zeros(shape, spec.dtype)

    return tf.nest.map_structure(zeros, features)

  def _make_accumulators(self):
    """Per task: [K] + v.shape rows next to each variable, and row tags."""
    self.accumulators = {}
    self.tags = {}
    self._has_grad = {}
    for name in self.names:
      k = self.plan.task_workers[name]
      accs = []
      for v in self.steps[name].variables:
        with self.strategy.extended.colocate_vars_with(v):
          accs.append(tf.Variable(
              lambda v=v: tf.zeros([k] + v.shape.as_list(), v.dtype),
              trainable=False, name=f'accumulator_{name}'))
      self.accumulators[name] = accs
      with self.strategy.extended.colocate_vars_with(self.state.task_steps[name]):
        self.tags[name] = tf.Variable(tf.fill([k], tf.constant(-1, tf.int64)),
                                      trainable=False, name=f'tags_{name}')
    self.stop_flag = tf.Variable(False, trainable=False, name='stop')

  # Worker side ----------------------------------------------------------------
  def _work_fn(self, ticks, *iterators):
    worker = tf.cast(
        tf.distribute.coordinator.experimental_get_current_worker_index(),
        tf.int32)
    branches = [functools.partial(self._task_branch, name, iterators[i], ticks,
                                  worker)
                for i, name in enumerate(self.names)]
    return tf.switch_case(tf.gather(self._task_table, worker), branches)

  def _task_branch(self, name, iterator, ticks, worker):
    step = self.steps[name]
    task = self.tasks[name]
    ranks = [r if t == name else 0 for t, r in self.plan.assignments()]
    rank = tf.gather(tf.constant(ranks, tf.int64), worker)
    round_var = self.state.task_steps[name]
    tags = self.tags[name]
    target = self.plan.task_steps.get(name, -1)
    own_tag = tf.gather(tags.read_value(), rank)
    max_polls = int(MAX_WAIT_SECONDS / POLL_SECONDS)

    def finished(n):
      stop = self.stop_flag.read_value()
      if target >= 0:
        stop = tf.logical_or(stop, n >= target)
      return stop

    def keep_waiting(i, n):
      return tf.logical_and(
          tf.logical_and(tf.equal(own_tag, n), i < max_polls),
          tf.logical_not(finished(n)))

    def poll(i, n):
      tick = next(ticks)
      with tf.control_dependencies([tick]):
        return i + 1, round_var.read_value()

    _, n = tf.while_loop(keep_waiting, poll,
                         [tf.constant(0), round_var.read_value()])

    def report(status, loss=0.0, position=-1, examples=0, seconds=0.0):
      return {'task': tf.constant(self.names.index(name), tf.int32),
              'worker': worker, 'rank': tf.cast(rank, tf.int32), 'round': n,
              'status': tf.constant(status, tf.int32),
              'loss': tf.cast(loss, tf.float32),
              'position': tf.cast(position, tf.int64),
              'examples': tf.cast(examples, tf.int32),
              'seconds': tf.cast(seconds, tf.float64)}

    def compute():
      start = tf.timestamp()
      features, labels = next(iterator)
      result = step.compute_gradients(features, labels)
      grads = result['grads']
      self._has_grad[name] = [g is not None for g in grads]

      def write():
        index = tf.reshape(rank, [1])
        writes = [acc.scatter_update(tf.IndexedSlices(g[tf.newaxis], index))
                  for acc, g in zip(self.accumulators[name], grads)
                  if g is not None]
        with tf.control_dependencies(writes):
          tagged = tags.scatter_update(tf.IndexedSlices(tf.reshape(n, [1]),
                                                        index))
        with tf.control_dependencies([tagged]):
          return tf.constant(CONTRIBUTED)

      def drop():
        step.restore_moving_statistics(result['saved_moving'])
        return tf.constant(NONFINITE)

      status = tf.cond(result['finite'], write, drop)
      with tf.control_dependencies([status]):
        seconds = tf.timestamp() - start
      out = report(0, result['loss'],
                   tf.reduce_max(features['index']) + 1,
                   task.examples_in(features), seconds)
      out['status'] = status
      return out

    return tf.cond(
        finished(n), lambda: report(IDLE),
        lambda: tf.cond(tf.equal(own_tag, n), lambda: report(WAITING), compute))

  # Coordinator side -----------------------------------------------------------
  def _apply_fn(self, name):
    """Applies task `name`'s round: mean of the rows, then round += 1."""
    pairs = [(acc, v) for acc, v, has in zip(self.accumulators[name],
                                             self.steps[name].variables,
                                             self._has_grad[name]) if has]
    optimizer = self.optimizers[name]

    def replica_fn():
      grads_and_vars = []
      for acc, v in pairs:
        with tf.device(acc.device):
          grads_and_vars.append((tf.reduce_mean(acc, axis=0), v))
      applied = optimizer.apply_gradients(grads_and_vars)
      with tf.control_dependencies([applied]):
        return tf.constant(True)

    done = self.strategy.run(replica_fn)
    with tf.control_dependencies([done]):
      self.state.task_steps[name].assign_add(1)
      self.state.global_step.assign_add(1)

  def step_cost(self, name) -> Optional[float]:
    """Device-hours per worker step of task `name` (None until measured)."""
    cfg = self.config
    if cfg.tasks[name].step_cost is not None or cfg.cost_model == 'paper':
      return cfg.step_cost_from_paper(name)
    count = self._time_count[name]
    return None if count == 0 else self._time_sum[name] / count / 3600.0

  def costs(self) -> Dict[str, float]:
    out = {}
    for name in self.names:
      c = self.step_cost(name)
      out[name] = 0.0 if c is None else c * self._worker_steps[name]
    return out

  def _sync_state(self):
    """Copies the coordinator's counters into the (checkpointed) variables."""
    s = self.state
    for name in self.names:
      s.skipped_steps[name].assign(self._skipped[name])
      s.time_sum[name].assign(self._time_sum[name])
      s.time_count[name].assign(self._time_count[name])
      s.positions[name].assign(self._positions[name][0])
      self.dstate.worker_steps[name].assign(self._worker_steps[name])
      for r, value in enumerate(self._positions[name]):
        self.dstate.positions[name][str(r)].assign(value)

  def save(self):
    self._sync_state()
    return super().save()

  def _maybe_snapshot(self, total_cost):
    every = self.config.snapshot_cost
    if every and int(total_cost // every) > int(self.state.snapshots.numpy()):
      self._sync_state()
      super()._maybe_snapshot(total_cost)

  def _cluster_failure(self, e):
    """A clear exception for an error that ends the run."""
    text = str(e)
    missing = re.search(r'Could not find callback with key=(' +
                        re.escape(PY_FUNCTION_PREFIX) + r'/([^/\s]+)/(\d+)/[^\s]*)',
                        text)
    if missing:
      name, rank = missing.group(2), int(missing.group(3))
      worker = self.plan.workers_of(name)[rank] if name in self.plan.task_workers else '?'
      return configs.ConfigError(
          f'worker {worker} has not registered the input pipeline of {name} '
          f'rank {rank} ({missing.group(1)}): start every worker with '
          f'`python -m mtssl.train` and the same flags as the coordinator '
          f'(its data flags, seed or code differ).')
    ps = set(re.findall(r'/job:ps/replica:0/task:(\d+)', text))
    for index, address in enumerate(cluster_dict(self.resolver).get(JOB_PS, [])):
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
      manager = getattr(self, 'manager', None)
      latest = manager.latest_checkpoint if manager is not None else None
      return ClusterError(
          f'Lost {which} ({first[:160]}). Training stops; the last checkpoint '
          f'is {latest}. Restart the parameter server(s), then the '
          f'coordinator with the same flags: it resumes from that checkpoint.')
    return None

  def train(self):
    """Runs until every task's --task_steps, --steps or --max_cost."""
    with self._explained_failures():
      return self._train()

  def _load_counters(self):
    """Python mirrors of the run state (reading a variable is an RPC)."""
    s, names, plan = self.state, self.names, self.plan
    self._rounds = {n: int(s.task_steps[n].numpy()) for n in names}
    self._global = int(s.global_step.numpy())
    self._skipped = {n: int(s.skipped_steps[n].numpy()) for n in names}
    self._time_sum = {n: float(s.time_sum[n].numpy()) for n in names}
    self._time_count = {n: int(s.time_count[n].numpy()) for n in names}
    self._worker_steps = {n: int(self.dstate.worker_steps[n].numpy())
                          for n in names}
    self._positions = {n: [int(self.dstate.positions[n][str(r)].numpy())
                           for r in range(plan.task_workers[n])]
                       for n in names}
    # Ranks that hold the current round of each task: rank -> report, or
    # None when only a wait proved it (the contribution's report was lost).
    self._contributed = {n: {} for n in names}
    self._consecutive_bad = collections.Counter()
    self._window = {n: collections.defaultdict(float) for n in names}
    self._warm_workers = set()
    self._idle_workers = set()
    self._worker_log = collections.defaultdict(collections.Counter)

  def _finished(self):
    cfg, plan = self.config, self.plan
    if plan.task_steps and all(
        self._rounds[n] >= plan.task_steps.get(n, float('inf'))
        for n in self.names):
      return True
    if cfg.steps is not None and self._global >= cfg.steps:
      return True
    return (cfg.max_cost is not None
            and sum(self.costs().values()) >= cfg.max_cost)

  def _handle(self, r):
    """Counts one work report; applies the task's round when it is complete."""
    cfg = self.config
    name = self.names[int(r['task'])]
    rank, n, status = int(r['rank']), int(r['round']), int(r['status'])
    worker = int(r['worker'])
    self._worker_log[worker][name] += status == CONTRIBUTED
    if status == IDLE:
      self._idle_workers.add(worker)
      return
    self._idle_workers.discard(worker)
    if status == NONFINITE:
      self._skipped[name] += 1
      self._consecutive_bad[name] += 1
      bad = self._consecutive_bad[name]
      self._positions[name][rank] = max(self._positions[name][rank],
                                        int(r['position']))
      logging.warning('%s rank %d: non-finite loss or gradient in round %d '
                      '(%d in a row); batch dropped.', name, rank, n, bad)
      if bad >= cfg.max_nonfinite_steps:
        raise trainer_lib.NonFiniteLossError(
            f'{name}: {bad} consecutive non-finite steps (max_nonfinite_steps='
            f'{cfg.max_nonfinite_steps}); stopping. The last good checkpoint '
            f'is {self.manager.latest_checkpoint}.')
      return
    if n != self._rounds[name]:
      return  # a report on a round applied since: nothing to count
    if status == CONTRIBUTED:
      self._consecutive_bad[name] = 0
      self._contributed[name][rank] = {
          'loss': float(r['loss']), 'position': int(r['position']),
          'examples': int(r['examples'])}
      if worker in self._warm_workers:  # a worker's first step warms up
        self._time_sum[name] += float(r['seconds'])
        self._time_count[name] += 1
      self._warm_workers.add(worker)
    else:  # WAITING on round n: the rank's row holds round n.
      self._contributed[name].setdefault(rank, None)
    if len(self._contributed[name]) == self.plan.task_workers[name]:
      self._apply_round(name)

  def _apply_round(self, name):
    self._apply[name]()
    self._rounds[name] += 1
    self._global += 1
    self._worker_steps[name] += self.plan.task_workers[name]
    w = self._window[name]
    for rank, info in self._contributed[name].items():
      if info is None:
        continue
      self._positions[name][rank] = max(self._positions[name][rank],
                                        info['position'])
      w['loss'] += info['loss']
      w['contributions'] += 1
    self._contributed[name] = {}

  def _train(self):
    self.setup()
    cfg = self.config
    self._load_counters()
    start_time, start_global = time.time(), self._global
    checkpoint_path = self.resumed_from
    saved_at = start_global if self.resumed_from else None
    if self.resumed_from:
      logging.info('Resuming from %s at global step %d, task steps %s.',
                   self.resumed_from, self._global, self._rounds)
    closures = _Closures(self.coordinator, self._work,
                         (self._ticks,) + tuple(self.iterators[n]
                                                for n in self.names))
    traced = False
    while not self._finished() and not self._stop_requested:
      closures.fill(self.plan.num_workers - len(self._idle_workers))
      if not traced:
        # While the workers start on the first closures.
        traced = True
        for name in self.names:
          self._apply[name].get_concrete_function()
      report = closures.next(timeout=1.0)
      if report is None:
        continue
      before = self._global
      self._handle(report)
      if self._global == before:
        continue
      g = self._global
      costs = self.costs()
      self._maybe_snapshot(sum(costs.values()))
      if g % cfg.summary_every == 0:
        self._write_distributed_scalars(costs, g)
      if g % cfg.log_every == 0:
        self._log_distributed(costs, g, start_global, start_time)
      if g % cfg.checkpoint_every == 0:
        checkpoint_path = self.save()
        saved_at = g
    if self._stop_requested:
      logging.info('Stop requested: saving and ending.')
    # Releases the closures still waiting on the workers.
    self.stop_flag.assign(True)
    if saved_at != self._global:
      checkpoint_path = self.save()
    self.writer.flush()
    result = {
        'checkpoint': checkpoint_path,
        'global_step': self._global,
        'task_steps': dict(self._rounds),
        'worker_steps': dict(self._worker_steps),
        'skipped_steps': dict(self._skipped),
        'cost_hours': self.costs(),
        'positions': {n: list(p) for n, p in self._positions.items()},
        'worker_contributions': {w: dict(c) for w, c
                                 in sorted(self._worker_log.items())},
        'worker_tasks': {w: t for w, (t, _) in
                         enumerate(self.plan.assignments())},
        'stopped_early': self._stop_requested,
    }
    io_utils.atomic_write_json(os.path.join(cfg.model_dir, RESULT_FILE), result)
    logging.info('Done: %s', result)
    return result

  def _write_distributed_scalars(self, costs, g):
    with self.writer.as_default(step=g):
      for name in self.names:
        w = self._window[name]
        prefix = f'{name}/'
        if w['contributions']:
          tf.summary.scalar(prefix + 'loss', w['loss'] / w['contributions'])
        tf.summary.scalar(prefix + 'steps', self._rounds[name])
        tf.summary.scalar(prefix + 'worker_steps', self._worker_steps[name])
        tf.summary.scalar(prefix + 'cost_hours', costs[name])
      tf.summary.scalar('total/cost_hours', sum(costs.values()))

  def _log_distributed(self, costs, g, start_global, start_time):
    cfg = self.config
    rate = (g - start_global) / max(time.time() - start_time, 1e-9)
    parts = []
    for name in self.names:
      w = self._window[name]
      loss = (f'loss {w["loss"] / w["contributions"]:.4g}'
              if w['contributions'] else 'loss -')
      parts.append(f'{name} {self._rounds[name]} st {loss} '
                   f'({self.plan.task_workers[name]} workers)')
      w.clear()
    total_cost = sum(costs.values())
    eta = (cfg.steps - g) / rate if cfg.steps is not None and rate > 0 else None
    target = f'{g}/{cfg.steps}' if cfg.steps is not None else f'{g}'
    logging.info('[%s] %s | %.2f rounds/s | cost %.4g h | eta %s', target,
                 ' | '.join(parts), rate, total_cost,
                 trainer_lib._format_duration(eta))  # pylint: disable=protected-access


class _Closures:
  """Schedules work closures and collects their reports.

  Each report is fetched by a daemon thread, so that a closure that never
  runs (queued for a worker that never comes back) cannot keep the
  coordinator from exiting.
  """

  def __init__(self, coordinator, fn, args):
    self._coordinator = coordinator
    self._fn = fn
    self._args = args
    self._reports = queue.Queue()
    self._traced = False
    self.outstanding = 0
    self.lost_reports = 0

  def fill(self, target):
    while self.outstanding < target:
      t0 = time.time()
      remote = self._coordinator.schedule(self._fn, args=self._args)
      if not self._traced:
        self._traced = True
        logging.info('Traced the work function in %.1f s.', time.time() - t0)
      threading.Thread(target=self._fetch, args=(remote,), daemon=True,
                       name='mtssl-fetch').start()
      self.outstanding += 1

  def _fetch(self, remote):
    try:
      self._reports.put((remote.fetch(), None))
    except tf.errors.UnavailableError as e:
      if _lost_worker_result(e):
        # The closure ran, but its worker went away before its report was
        # copied back. Its gradient row is on the ps; only the report is
        # lost, which the round bookkeeping allows for (`_contributed`).
        self._reports.put((None, LOST_REPORT))
      else:
        self._reports.put((None, e))
    except Exception as e:  # pylint: disable=broad-except
      self._reports.put((None, e))

  def next(self, timeout):
    """The next report, None after `timeout` s or for a lost report;
    re-raises a closure's error."""
    try:
      report, error = self._reports.get(timeout=timeout)
    except queue.Empty:
      return None
    self.outstanding -= 1
    if error is LOST_REPORT:
      self.lost_reports += 1
      logging.warning('A work report was lost with its worker (%d so far); '
                      'the worker\'s next closure reports its state.',
                      self.lost_reports)
      return None
    if error is not None:
      raise error
    return report


LOST_REPORT = object()


def _lost_worker_result(error: tf.errors.UnavailableError) -> bool:
  """Whether `error` is a worker's result that could not be copied back.

  ClusterCoordinator re-runs a closure whose worker fails while it runs, but
  a result already computed lives on the worker until it is fetched; a
  worker lost in between makes the fetch fail with an UnavailableError that
  names the worker as the remote target. A lost ps is not this case.
  """
  text = str(error)
  return '/job:worker/' in text and '/job:ps/' not in text
