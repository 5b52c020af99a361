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

from mtssl.configs import base as config_base
from mtssl.configs import data_service as configs

def main(argv, flag_values=flags.FLAGS) -> int:
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  config = config_base.apply_flags(configs.DataServiceConfig(), flag_values)
  try:
    config.validate()
  except config_base.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtssl.data import service  # pylint: disable=g-import-not-at-top
  service_lib = tf.data.experimental.service
  dispatcher = None
  where = (f'workers for dispatcher {config.dispatcher}' if config.dispatcher
           else f'dispatcher on port {config.port}')
  try:
    if config.dispatcher:
      host, port = service.parse_address(config.dispatcher)
    else:
      dispatcher = service_lib.DispatchServer(service_lib.DispatcherConfig(
          port=config.port, work_dir=config.work_dir,
          fault_tolerant_mode=bool(config.work_dir)))
      host, port = 'localhost', int(dispatcher.target.rsplit(':', 1)[1])
    workers = [service_lib.WorkerServer(service_lib.WorkerConfig(
        dispatcher_address=f'{host}:{port}',
        worker_address=f'{config.worker_host}:%port%'))
               for _ in range(config.workers)]
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
  config_base.define_flags(configs.DataServiceConfig)
  app.run(main, flags_parser=config_base.parse_command_line)


if __name__ == '__main__':
  run()
