"""Evaluates a pre-trained trunk the paper's three ways: `python -m mtssl.evaluate`.

    python -m mtssl.evaluate linear --init_checkpoint=CKPT --model_dir=DIR
    python -m mtssl.evaluate depth --helpfull   # a protocol's flags, defaults

Flags are generated from mtssl.configs.evaluation; usage, outputs and exit
statuses: README, "Evaluating a trunk".
"""

import sys

from absl import app
from absl import flags
from absl import logging

from mtssl.configs import evaluation as evaluation_config
from mtssl.evaluation import registry

FLAGS = flags.FLAGS
EXIT_USAGE = 2

def _usage(given) -> str:
  return (f'give exactly one protocol ({", ".join(registry.protocol_names())})'
          f'; got {" ".join(given) or "nothing"}. Usage: python -m '
          f'mtssl.evaluate PROTOCOL --model_dir=DIR [--init_checkpoint=CKPT] '
          f'[--data=...]; python -m mtssl.evaluate PROTOCOL --helpfull lists '
          f'its flags.')


def _fail(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return EXIT_USAGE


def parse_flags(argv, flag_values=FLAGS):
  """Defines the flags of the protocol argv[1] names, then parses argv.

  Exits with status 2 and one line on an unknown protocol or a bad flag.
  """
  protocol = argv[1] if len(argv) > 1 else ''
  if protocol not in registry.protocol_names():
    sys.exit(_fail(_usage([a for a in argv[1:] if not a.startswith('-')])))
  try:
    evaluation_config.define_flags(protocol, flag_values)
    return flag_values(argv)
  except (flags.Error, ValueError) as e:
    sys.exit(_fail(str(e)))


def main(argv, flag_values=FLAGS) -> int:
  if len(argv) != 2:
    return _fail(_usage(argv[1:]))
  protocol = argv[1]
  # pylint: disable=g-import-not-at-top
  from mtssl.evaluation import data as data_lib
  from mtssl.evaluation import factory
  from mtssl.evaluation import runner
  from mtssl.evaluation import trunks
  # pylint: enable=g-import-not-at-top
  try:
    evaluation = factory.make_evaluation(
        evaluation_config.from_flags(protocol, flag_values))
  except ValueError as e:  # every check of flags, trunk and data
    return _fail(str(e))
  try:
    report = evaluation.run()
  except (trunks.TrunkLoadError, data_lib.DataSourceError,
          runner.EvaluationError) as e:
    return _fail(str(e))
  logging.info('Metrics: %s', report['metrics'])
  print(f'{protocol}: fills {report["paper_columns"]}')
  print(evaluation.protocol_class.table_header)
  print(report['table_row'])
  print(f'headline {report["headline"]} = {report["metrics"][report["headline"]]:.2f}'
        f' (chance {report["chance"].get(report["headline"], float("nan")):.2f})')
  print(f'Wrote {evaluation.run_config.model_dir}/{protocol}_metrics.json')
  return 0


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
