r"""Starts a tf.data service: a dispatcher and workers that run input pipelines.

  python -m mtssl.data_service --port=5050 --workers=4
  python -m mtssl.train --rp_data=tfrecord:/data/shards \
      --data_service=grpc://HOST:5050

With `--dispatcher=HOST:PORT` only workers start, and join that dispatcher
(workers on more machines). Runs until interrupted. The pipelines it serves
come from the trainer, which checks that they run no Python (tfrecord:
sources). Exit status 2 on a bad flag or a port in use.
"""

import sys
import time

from absl import app
from absl import flags

_PORT = flags.DEFINE_integer('port', 5050, 'Dispatcher port.', lower_bound=0)
_WORKERS = flags.DEFINE_integer('workers', 1, 'Workers to start here.',
                                lower_bound=0)
_DISPATCHER = flags.DEFINE_string(
    'dispatcher', None, 'HOST:PORT of a running dispatcher: start only workers.')
_HOST = flags.DEFINE_string('worker_host', 'localhost', 'Name under which '
                            'clients reach this machine\'s workers.')


def main(argv) -> int:
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtssl.data import service  # pylint: disable=g-import-not-at-top
  service_lib = tf.data.experimental.service
  dispatcher = None
  where = (f'workers for dispatcher {_DISPATCHER.value}' if _DISPATCHER.value
           else f'dispatcher on port {_PORT.value}')
  try:
    if _DISPATCHER.value:
      host, port = service.parse_address(_DISPATCHER.value)
    else:
      dispatcher = service_lib.DispatchServer(
          service_lib.DispatcherConfig(port=_PORT.value))
      host, port = 'localhost', int(dispatcher.target.rsplit(':', 1)[1])
    workers = [service_lib.WorkerServer(service_lib.WorkerConfig(
        dispatcher_address=f'{host}:{port}',
        worker_address=f'{_HOST.value}:%port%'))
               for _ in range(_WORKERS.value)]
  except (service.DataServiceError, tf.errors.OpError, RuntimeError) as e:
    print(f'error: cannot start the {where}: {str(e).splitlines()[0]} (is the '
          f'port in use?)', file=sys.stderr)
    return 2
  print(f'data service: dispatcher grpc://{host}:{port}'
        f'{" (remote)" if dispatcher is None else ""}, {len(workers)} '
        f'worker(s) here.', flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  return 0


def run():
  app.run(main)


if __name__ == '__main__':
  run()
