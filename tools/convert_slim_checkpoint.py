r"""Converts a TF-Slim ResNet-v2 checkpoint into a TF2 checkpoint of the trunk.

  python tools/convert_slim_checkpoint.py \
      --slim_checkpoint=/data/multiself/model.ckpt \
      --output_dir=/data/multiself_tf2 --depth=101 --num_blocks=3

The output directory holds `backbone-1.{index,data-*}` (a
`tf.train.Checkpoint(backbone=trunk)`, what `--init_checkpoint` and Model
Garden's `init_checkpoint_modules: backbone` read), a `checkpoint` state file
and `conversion_report.json` listing every checkpoint variable the trunk did not
use (block 4, logits, optimizer slots...). It is written atomically: on any
error nothing is written. Exit status 2 means the checkpoint does not fit the
trunk; the message names the variable(s) and shapes.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from mtssl.backbones import slim_checkpoint

_SLIM_CHECKPOINT = flags.DEFINE_string(
    'slim_checkpoint', None, 'TF-Slim checkpoint prefix or directory.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Directory to write the converted checkpoint to.')
_DEPTH = flags.DEFINE_enum('depth', '101', ['50', '101', '152', '200'],
                           'ResNet-v2 depth of the trunk.')
_NUM_BLOCKS = flags.DEFINE_integer(
    'num_blocks', 3, 'Blocks to keep (3: the paper trunk, 4: full network).',
    lower_bound=1, upper_bound=4)
_SCOPE = flags.DEFINE_string(
    'checkpoint_scope', None,
    'Slim scope in the checkpoint (default: detected, e.g. resnet_v2_101).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Replace an existing output directory.')
flags.mark_flags_as_required(['slim_checkpoint', 'output_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    prefix, report = slim_checkpoint.convert_slim_checkpoint(
        _SLIM_CHECKPOINT.value, _OUTPUT_DIR.value, depth=int(_DEPTH.value),
        num_blocks=_NUM_BLOCKS.value, checkpoint_scope=_SCOPE.value,
        overwrite=_OVERWRITE.value)
  except (slim_checkpoint.SlimCheckpointError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  logging.info('Loaded %d variables from %s (scope %s).', len(report.loaded),
               report.checkpoint, report.checkpoint_scope)
  if report.unused:
    logging.info('%d checkpoint variables are not part of the trunk:',
                 len(report.unused))
    for group, count in report.unused_summary().items():
      logging.info('  %-40s %d variables', group, count)
    logging.info('Full list: %s', os.path.join(_OUTPUT_DIR.value,
                                               'conversion_report.json'))
  print(f'Wrote {prefix}')
  return 0


if __name__ == '__main__':
  app.run(main)
