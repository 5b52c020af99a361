r"""Colorizes images with a trained trunk and colorization head.

  python tools/colorize.py --checkpoint=/runs/rp_col/ckpt-100000 \
      --source=folder:/data/photos --num_images=16 --output_dir=/tmp/colorized

Writes `colorized_NNNN.png` per image: gray input | prediction | original,
side by side, each `--image_size` square (centre crop of the image after
resizing its shorter side). Images are taken in the order of the source's
stream under `--seed`; grayscale photos are colorized too.

The checkpoint is a prefix or a directory (its latest checkpoint) written as

  tf.train.Checkpoint(backbone=trunk, heads={'col': head})

which is what the trainer writes (MultiTaskModel.checkpoint_items: its other
heads, lasso entries and optimizer state are ignored). A network trained with
the lasso needs `--lasso`, which also restores `lasso={'col': ...}`. The
trunk and head shapes come from `--trunk` and `--head_widths` and must match
the checkpoint; a mismatch exits with status 2 and names the first object
that did not match.
"""

import os
import sys

from absl import app
from absl import flags

# TensorFlow and mtssl load in main(), once the flags are checked.

_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'Checkpoint prefix or directory.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None,
                                  'Directory for the PNG files.')
_SOURCE = flags.DEFINE_string('source', 'synthetic', 'Image source.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'Images to colorize.',
                                   lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Order of the source stream.')
_TRUNK = flags.DEFINE_string(
    'trunk', 'resnet_v2_101', 'Trunk preset (mtssl.backbones.resnet_v2.'
    'TRUNK_BLOCKS), run at output stride 8.')
_HEAD_WIDTHS = flags.DEFINE_list('head_widths', ['4096', '4096'],
                                 'Widths of the head\'s hidden convolutions.')
_HEAD_BATCH_NORM = flags.DEFINE_bool('head_batch_norm', True,
                                     'Whether the head has batch norm.')
_LASSO = flags.DEFINE_bool('lasso', False,
                           'The network was trained with the unit lasso.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 256, 'Input size.')
_TEMPERATURE = flags.DEFINE_float(
    'temperature', None, 'Annealed-mean temperature (default: the task\'s, 0.38).')
_TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', None,
                                     'TFDS data directory.')
flags.mark_flags_as_required(['checkpoint', 'output_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpoint = _CHECKPOINT.value
  if not (os.path.isdir(checkpoint) or os.path.exists(checkpoint + '.index')
          or '://' in checkpoint):
    print(f'error: checkpoint {checkpoint!r} not found (expected a directory '
          f'or a prefix with a .index file).', file=sys.stderr)
    return 2
  # pylint: disable=g-import-not-at-top
  from mtssl.models import multitask as model_lib
  from mtssl.backbones import resnet_v2
  from mtssl.data import sources
  from mtssl.tasks import col
  # pylint: enable=g-import-not-at-top
  try:
    config = col.ColConfig(
        image_size=_IMAGE_SIZE.value,
        head_widths=tuple(int(w) for w in _HEAD_WIDTHS.value),
        head_batch_norm=_HEAD_BATCH_NORM.value)
    if _TEMPERATURE.value is not None:
      config.temperature = _TEMPERATURE.value
    task = col.ColorizationTask(config)
    trunk = resnet_v2.trunk_from_name(_TRUNK.value, output_stride=8)
    model = model_lib.MultiTaskModel(trunk, {'col': task},
                                     lasso_l1=0.0 if _LASSO.value else None)
    source = task.make_source(_SOURCE.value, tfds_data_dir=_TFDS_DATA_DIR.value)
    source.validate()
    images = [image for _, image in source.images(_SEED.value).take(
        _NUM_IMAGES.value).as_numpy_iterator()]
    col.colorize_images(model, images[:1])  # Creates the variables.
    path = col.restore_col_model(model, checkpoint)
    panels = col.colorize_images(model, images)
  except (sources.DataSourceError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for written in col.write_panels(panels, _OUTPUT_DIR.value):
    print(f'Wrote {written}')
  print(f'Colorized {len(panels)} images with {path}.')
  return 0


if __name__ == '__main__':
  app.run(main)
