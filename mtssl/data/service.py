"""Running a task's input pipeline on tf.data service workers.

`distribute` hands the whole batched pipeline of a task to a dispatcher
(`grpc://HOST:PORT`) under a job named after the task, its seed and its start
position. Two processing modes:

* `dynamic` (ShardingPolicy.DYNAMIC): the dispatcher deals stream positions
  out to the workers, each position is processed at most once, batches arrive
  in the order workers finish them.
* `off` (ShardingPolicy.OFF): every worker runs the whole stream. With one
  worker the batches are exactly those of the local pipeline; with N workers
  every batch arrives N times.

Only pipelines without Python in them can run on a worker: sources whose
counter is graph-only (tfrecord:) are; the others are refused by name.
"""

import contextlib
import re
import socket
import threading
from typing import Tuple

import tensorflow as tf
from absl import logging

from mtssl.data import problems
from mtssl.data import sources

MODES = ('dynamic', 'off')
CONNECT_TIMEOUT_S = 10.0
_ADDRESS = re.compile(r'^(?:grpc://)?([^:/\s]+):(\d{1,5})$')


class DataServiceError(sources.DataSourceError):
  """A data service that cannot serve a task (address, reachability, source)."""


def parse_address(address: str) -> Tuple[str, int]:
  """(host, port) of `[grpc://]HOST:PORT`; DataServiceError otherwise."""
  match = _ADDRESS.match(address or '')
  if not match or not 0 < int(match.group(2)) < 65536:
    raise DataServiceError(f'data service address {address!r} is not '
                           f'grpc://HOST:PORT.')
  return match.group(1), int(match.group(2))


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
  """Raises DataServiceError unless a TCP connection to the dispatcher opens
  within `timeout` seconds (TensorFlow's client would retry for long)."""
  host, port = parse_address(address)
  try:
    with socket.create_connection((host, port), timeout=timeout):
      pass
  except OSError as e:
    raise DataServiceError(
        f'data service dispatcher {address} is unreachable '
        f'({e.strerror or type(e).__name__}); start one with '
        f'`python -m mtssl.data_service --port={port} --workers=N`.') from None


def check_servable(task: str, source) -> None:
  """Raises DataServiceError when `source` runs Python per example."""
  if not problems.is_graph_only(source):
    raise DataServiceError(
        f'{task}_data={source.name}: this source runs Python per example '
        f'(tf.numpy_function), which tf.data service workers cannot run; '
        f'serve a folder: or tfrecord: source (tools/make_shards.py) '
        f'instead.')


def raise_if_job_lost(error: Exception, task: str, address: str) -> None:
  """Re-raises tf.data's error for a dispatcher that lost the job (restarted
  without a journal) as a DataServiceError that says what to do."""
  if (isinstance(error, tf.errors.NotFoundError)
      and 'iteration client id' in str(error)):
    raise DataServiceError(
        f'{task}: the data service dispatcher {address} was restarted '
        f'without a journal and no longer knows this run\'s job. Rerun the '
        f'command to resume from the last checkpoint (a new job), and start '
        f'the dispatcher with --work_dir=DIR so that a restart keeps its '
        f'jobs.') from None


def job_name(task: str, seed: int, start: int) -> str:
  return f'mtssl-{task}-seed{seed}-from{start}'


def distribute(ds: tf.data.Dataset, address: str, job: str,
               mode: str = 'dynamic') -> tf.data.Dataset:
  """`ds` produced by the service at `address`, as job `job`."""
  if mode not in MODES:
    raise DataServiceError(f'data_service_mode must be one of {MODES}, got '
                           f'{mode!r}.')
  policy = (tf.data.experimental.service.ShardingPolicy.DYNAMIC
            if mode == 'dynamic' else
            tf.data.experimental.service.ShardingPolicy.OFF)
  host, port = parse_address(address)
  return ds.apply(tf.data.experimental.service.distribute(
      processing_mode=policy, service=f'grpc://{host}:{port}', job_name=job))


@contextlib.contextmanager
def waiting_notice(task: str, address: str, every_s: float = 60.0):
  """Logs a warning every `every_s` seconds while the block runs: the first
  batch waits without end on a dispatcher that has no worker."""
  stop = threading.Event()

  def _warn():
    waited = 0.0
    while not stop.wait(every_s):
      waited += every_s
      logging.warning(
          '%s: no batch from the data service %s after %d s; is a worker '
          'registered with the dispatcher (python -m mtssl.data_service '
          '--dispatcher=HOST:PORT --workers=N)?', task, address, waited)

  thread = threading.Thread(target=_warn, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
