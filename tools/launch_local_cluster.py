r"""Runs a whole distributed training cluster on this machine.

Starts the parameter servers, the workers and the coordinator as separate
processes on free localhost ports, each with its own TF_CONFIG and the same
`python -m mtssl.train` flags (everything after `--`), exactly as on a real
cluster; waits for the coordinator and tears everything down (also on
Ctrl-C or an error).

  python tools/launch_local_cluster.py --num_ps=1 -- \
      --tasks=rp,col --task_workers=rp:2,col:1 --trunk=resnet_v2_tiny \
      --steps=200 --model_dir=/tmp/mtssl_cluster_run

The number of workers is the sum of --task_workers unless --num_workers says
otherwise. With --data_service_workers=N a tf.data service (a dispatcher and N
workers) starts too and every task's pipeline runs on it (the training flags
gain --data_service; the tasks must read tfrecord: shards). Like a cluster
manager, the launcher restarts a parameter server or worker that dies, and
restarts the coordinator when it stops because a parameter server was lost
(exit status 4), up to --max_restarts times; it resumes from the last
checkpoint. Logs: <cluster_log_dir>/<job>-<index>.log.
Exit status: the coordinator's.
"""

import time

from absl import app
from absl import flags
from absl import logging

from mtssl.training.cluster import local as local_cluster

EXIT_CLUSTER = 4  # mtssl.train: a parameter server was lost

_NUM_PS = flags.DEFINE_integer('num_ps', 1, 'parameter servers', lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', None, 'workers (default: the sum of --task_workers)',
    lower_bound=1)
_MODULE = flags.DEFINE_string('module', 'mtssl.train',
                              'module every process runs with python -m')
_LOG_DIR = flags.DEFINE_string('cluster_log_dir', 'cluster_logs',
                               'one log file per process')
_MAX_RESTARTS = flags.DEFINE_integer(
    'max_restarts', 3, 'restarts of dead servers and of the coordinator after '
    'a lost parameter server', lower_bound=0)
_DATA_SERVICE_WORKERS = flags.DEFINE_integer(
    'data_service_workers', 0, 'tf.data service workers that run the input '
    'pipelines (0: the cluster workers run them)', lower_bound=0)
_TIMEOUT = flags.DEFINE_float('timeout', 0, 'end everything after this many '
                              'seconds (0: no limit)', lower_bound=0)


def workers_from_args(args):
  """The sum of --task_workers=rp:2,col:1 among the training flags."""
  for arg in args:
    if arg.startswith('--task_workers='):
      total = 0
      for item in arg.split('=', 1)[1].split(','):
        if item.strip():
          try:
            total += int(item.split(':', 1)[1])
          except (IndexError, ValueError):
            raise app.UsageError(f'Cannot read {arg}.') from None
      return total
  return None


def main(argv):
  train_args = argv[1:]
  if not train_args:
    raise app.UsageError('Give the training flags after --, e.g. '
                         '-- --tasks=rp,col --task_workers=rp:2,col:1 ...')
  num_workers = _NUM_WORKERS.value or workers_from_args(train_args)
  if not num_workers:
    raise app.UsageError('Set --num_workers or pass --task_workers=... to the '
                         'training flags.')
  cluster = local_cluster.LocalCluster(
      ['-m', _MODULE.value] + train_args, num_ps=_NUM_PS.value,
      num_workers=num_workers, log_dir=_LOG_DIR.value,
      data_service_workers=_DATA_SERVICE_WORKERS.value)
  restarts = 0
  deadline = time.time() + _TIMEOUT.value if _TIMEOUT.value else None
  with cluster:
    logging.info('Cluster %s%s; logs in %s', cluster.addresses,
                 f', data service {cluster.data_service}'
                 if cluster.data_service else '', _LOG_DIR.value)
    cluster.start_servers()
    cluster.start_coordinator()
    while True:
      if deadline is not None and time.time() > deadline:
        logging.error('Timed out after %.0f s; stopping the cluster.',
                      _TIMEOUT.value)
        return 124
      for job, index in cluster.dead_servers():
        if restarts >= _MAX_RESTARTS.value:
          logging.error('%s %d died and --max_restarts=%d is used up. Its log '
                        'ends with:\n%s', job, index, _MAX_RESTARTS.value,
                        cluster.log_tail(job, index))
          return 1
        restarts += 1
        logging.warning('%s %d died; restarting it (%d/%d).', job, index,
                        restarts, _MAX_RESTARTS.value)
        cluster.restart(job, index)
      if not cluster.alive(local_cluster.CHIEF):
        rc = cluster.processes[(local_cluster.CHIEF, 0)].returncode
        if rc == EXIT_CLUSTER and restarts < _MAX_RESTARTS.value:
          restarts += 1
          logging.warning('The coordinator lost a parameter server; '
                          'restarting it from the last checkpoint (%d/%d).',
                          restarts, _MAX_RESTARTS.value)
          for job, index in cluster.dead_servers():
            cluster.restart(job, index)
          cluster.start_coordinator()
          continue
        logging.info('Coordinator exited with status %d; log: %s', rc,
                     cluster.log_path(local_cluster.CHIEF))
        return rc
      time.sleep(1.0)


if __name__ == '__main__':
  app.run(main)
