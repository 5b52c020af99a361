"""Shared pieces of the evaluation tests: a tiny prepared TFDS dataset."""

import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

TINY_TFDS_NAME = 'mtssl_tiny_labeled'


class MtsslTinyLabeled(tfds.core.GeneratorBasedBuilder):
  """Three classes of 24x20 noise images; 'test' holds one label -1.

  Like imagenet2012's test split, whose labels are all -1, it lets the tests
  meet a label outside the class range in a real TFDS dataset.
  """

  VERSION = tfds.core.Version('1.0.0')
  # TFDS derives this from the module path through `importlib_resources`,
  # which it imports lazily and does not depend on; the file is the answer.
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=['a', 'b', 'c']),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(12, with_bad_label=False),
            'test': self._generate_examples(4, with_bad_label=True)}

  def _generate_examples(self, n, with_bad_label):
    rng = np.random.default_rng(n)
    for i in range(n):
      label = -1 if with_bad_label and i == 2 else i % 3
      yield i, {'image': rng.integers(0, 255, (24, 20, 3), dtype=np.uint8),
                'label': label}


def prepare_tiny_tfds(data_dir: str) -> str:
  """Prepares the tiny dataset under data_dir (once); returns data_dir."""
  if not os.path.isdir(os.path.join(data_dir, TINY_TFDS_NAME)):
    MtsslTinyLabeled(data_dir=data_dir).download_and_prepare()
  return data_dir


def write_name_checkpoint(prefix: str, values) -> str:
  """Writes {variable name: array} as a name-keyed (TF1 / Slim) checkpoint."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  names = sorted(values)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                    shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(values[n]) for n in names])
  return prefix
