"""Benchmarks of the training steps and input pipelines: `python -m mtssl.benchmark`.

    python -m mtssl.benchmark                      # steps and pipelines
    python -m mtssl.benchmark --what=steps --tasks=col --precisions=bf16

Usage and the reported columns: README, "Performance"; the parts live in
mtssl/benchmarking/.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from mtssl.configs import base as config_base
from mtssl.benchmarking import runner
from mtssl.benchmarking.settings import BenchmarkError
from mtssl.configs import benchmark as configs
from mtssl.data import sources
# pylint: enable=g-import-not-at-top,wrong-import-position

EXIT_USAGE = 2


def main(argv, flag_values=None) -> int:
  """Runs the benchmark the flags describe; the exit status."""
  fv = flag_values if flag_values is not None else flags.FLAGS
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return EXIT_USAGE
  try:
    config = configs.config_from_flags(fv)
    command = ' '.join(['python -m mtssl.benchmark']
                       + configs.given_flags(fv))
    _, paths = runner.run_benchmark(config, command)
  except (BenchmarkError, configs.ConfigError, sources.DataSourceError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  print(f'Wrote {paths["json"]} and {paths["markdown"]}')
  return 0


def run():
  configs.define_flags()
  app.run(main, flags_parser=config_base.parse_command_line)


if __name__ == '__main__':
  run()
