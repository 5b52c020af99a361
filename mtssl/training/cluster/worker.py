"""Parameter-server and worker processes of a cluster run, and the input
pipelines each worker registers for its task and rank."""

import contextlib
import hashlib
import itertools
import os
import threading
import time
from typing import Optional

import tensorflow as tf
from absl import logging
# Private TensorFlow modules, each used for one documented purpose:
# script_ops._py_funcs names the Python functions of input pipelines
# deterministically (see `worker_local_python_functions`), context gives the
# device they are placed on.
from tensorflow.python.eager import context as tf_context  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import script_ops  # pylint: disable=g-direct-tensorflow-import

from mtssl.configs import training as configs
from mtssl.data import problems as problems_lib
from mtssl.data import service
from mtssl.training import run as run_lib
from mtssl.training.cluster import plan as plan_lib
from mtssl.training.cluster.plan import (JOB_WORKER, PY_FUNCTION_PREFIX,
                                         RESULT_FILE, cluster_dict)


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
  base = run_lib.task_seed(seed, name)
  if rank == 0:
    return base
  return (base ^ ((rank * 0x9E3779B1) & 0x7FFFFFFF)) & 0x7FFFFFFF


def input_prefix(config: configs.TrainConfig, name: str,
                 rank: Optional[int]) -> str:
  """Name prefix of the Python functions of one rank's input pipeline (rank
  None: the task's served stream, shared by its group)."""
  run = config.tasks[name]
  seed = run_lib.task_seed(config.seed, name) if rank is None else rank_seed(
      config.seed, name, rank)
  key = repr((name, rank, seed, run.data, run.config, config.tfds_data_dir,
              config.data_service_for(name)))
  digest = hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]
  return f'{PY_FUNCTION_PREFIX}/{name}/{"served" if rank is None else rank}/{digest}'


def rank_pipeline(config, task, source, name, rank, start):
  """Rank `rank`'s batched stream of task `name`, from position `start`."""
  with worker_local_python_functions(input_prefix(config, name, rank)):
    return problems_lib.count_in_process(task.make_dataset(
        source, config.tasks[name].config.batch_size,
        seed=rank_seed(config.seed, name, rank), start=start), source.counter)


def served_pipeline(config, task, source, name, start):
  """Task `name`'s stream from position `start`, run by the tf.data service.

  One job per task (named after the task, its seed and `start`): every
  worker of the task's group is a consumer of that job and receives batches
  no other consumer receives; the problem counts of the batches a worker
  takes go to that worker's counter.
  """
  seed = run_lib.task_seed(config.seed, name)
  with worker_local_python_functions(input_prefix(config, name, None)):
    ds = task.make_dataset(source, config.tasks[name].config.batch_size,
                           seed=seed, start=start)
    ds = service.distribute(ds, config.data_service_for(name),
                            service.job_name(name, seed, start),
                            config.data_service_mode)
    return problems_lib.count_in_process(ds, source.counter)


def register_worker_inputs(config, name, rank):
  """Registers, in this worker process, rank `rank`'s pipeline of `name`.

  Returns what must stay alive while the worker serves: the traced pipeline
  (which holds its Python functions) and the source (whose skip counter the
  pipeline updates).
  """
  tasks = run_lib.make_tasks(config)
  task = tasks[name]
  source = run_lib.make_sources(config, {name: task})[name]

  def build():
    if config.data_service_for(name):
      return served_pipeline(config, task, source, name, start=0)
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


def run_server(resolver, config: configs.TrainConfig, plan: plan_lib.ClusterPlan,
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
                 input_prefix(config, name,
                              None if config.data_service_for(name) else rank))
  server = tf.distribute.Server(
      tf.train.ClusterSpec(cluster), job_name=job, task_index=index,
      protocol=resolver.rpc_layer or 'grpc', start=True)
  logging.info('Serving as %s %d at %s.', job, index, cluster[job][index])
  last_report = time.time()
  while True:
    time.sleep(1)  # a Slurm job ends when its last server does
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

