r"""Estimates the colour prior of colorization's class rebalancing from data.

  python tools/estimate_color_prior.py --source=folder:/data/imagenet/train \
      --num_images=20000 --output=/data/priors/imagenet_ab_prior.npy

Reads any image source (`synthetic`, `folder:/path`, `tfds:NAME[:SPLIT]`),
prepares `--num_images` examples exactly as the colorization task does for
training (random crop, target ab averaged to the output stride, grayscale
images skipped), counts the nearest ab bin of every target pixel and smooths
the histogram with a Gaussian of sigma 5 in ab units (mtssl.ops.ab_bins).
Writes the prior as a float64 .npy of shape [313] and, beside it, a .json with
the raw counts and how they were made; both atomically. Train with it through
the task's `prior_path`.

The built-in prior of the synthetic data (mtssl/data/priors/) was made with

  python tools/estimate_color_prior.py --source=synthetic --num_images=2000 \
      --seed=1 --output=mtssl/data/priors/synthetic_ab_prior.npy --overwrite

Exit status 2: the source or the output cannot be used (the message says why).
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

# TensorFlow and mtssl load in main(), once the flags are checked.

_SOURCE = flags.DEFINE_string(
    'source', 'synthetic', 'Image source: synthetic, folder:/path or '
    'tfds:NAME[:SPLIT].')
_OUTPUT = flags.DEFINE_string('output', None, 'Prior file to write (.npy).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 2000,
                                   'Examples to count.', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 1, 'Seed of the example stream.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 256, 'Task input size.')
_TARGET_STRIDE = flags.DEFINE_integer('target_stride', 8,
                                      'Output stride of the targets.')
_MIN_CHROMA = flags.DEFINE_float(
    'min_chroma', 3.0, 'Images with max |a|,|b| below this are skipped.')
_SIGMA = flags.DEFINE_float(
    'sigma', None, 'Smoothing Gaussian in ab units (default: 5, as the soft '
    'encoding).')
_TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', None,
                                     'TFDS data directory.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Replace an existing prior file.')
flags.mark_flag_as_required('output')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  output = _OUTPUT.value
  if not output.endswith('.npy'):
    print(f'error: --output {output!r} must end in .npy', file=sys.stderr)
    return 2
  if os.path.exists(output) and not _OVERWRITE.value:
    print(f'error: {output} already exists; pass --overwrite to replace it.',
          file=sys.stderr)
    return 2
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from mtssl.data import sources
  from mtssl.ops import ab_bins
  from mtssl.tasks import col
  # pylint: enable=g-import-not-at-top
  try:
    config = col.ColConfig(image_size=_IMAGE_SIZE.value,
                           target_stride=_TARGET_STRIDE.value,
                           min_chroma=_MIN_CHROMA.value)
    task = col.ColorizationTask(config, load_prior=False)
    source = task.make_source(_SOURCE.value, tfds_data_dir=_TFDS_DATA_DIR.value)
    start = time.time()
    sigma = ab_bins.SIGMA if _SIGMA.value is None else _SIGMA.value
    try:
      counts, prior = col.estimate_prior(task, source, _NUM_IMAGES.value,
                                         seed=_SEED.value, sigma=sigma)
    except tf.errors.OpError as e:
      # A source that stopped yielding (e.g. only grayscale images).
      sources.raise_if_stalled(e, source.counter)
      raise
  except (sources.DataSourceError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  problems = source.counter.problems()
  metadata = {
      'source': _SOURCE.value,
      'num_images': _NUM_IMAGES.value,
      'seed': _SEED.value,
      'image_size': _IMAGE_SIZE.value,
      'target_stride': _TARGET_STRIDE.value,
      'min_chroma': _MIN_CHROMA.value,
      'sigma': sigma,
      'ab_bins': ab_bins.bins_provenance(),
      'target_pixels': int(counts.sum()),
      'bins_hit': int((counts > 0).sum()),
      'skipped_or_converted': problems,
      'counts': counts.tolist(),
  }
  ab_bins.save_prior(output, prior, metadata)
  logging.info('Counted %d target pixels of %d images in %.1f s; %d of %d '
               'bins hit.', counts.sum(), _NUM_IMAGES.value,
               time.time() - start, (counts > 0).sum(), ab_bins.NUM_BINS)
  if problems:
    logging.info('Skipped or converted on the way: %s', problems)
  print(f'Wrote {output}')
  return 0


if __name__ == '__main__':
  app.run(main)
