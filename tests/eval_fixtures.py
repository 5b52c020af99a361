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


TINY_SCENES_NAME = 'mtssl_tiny_scenes'
SCENE_SIZE = (30, 40)


class MtsslTinyScenes(tfds.core.GeneratorBasedBuilder):
  """nyu_depth_v2-style depth and voc-style objects on 30x40 noise images.

  Image i has depth 1 + i everywhere (0 in its first row: no measurement)
  and one object of class i % 2 whose box covers rows 3..18 and columns
  4..24, difficult for odd i.
  """

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'depth': tfds.features.Tensor(shape=SCENE_SIZE, dtype=np.float16),
            'objects': tfds.features.Sequence({
                'bbox': tfds.features.BBoxFeature(),
                'label': tfds.features.ClassLabel(names=['p', 'q']),
                'is_difficult': np.bool_,
            }),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(4)}

  def _generate_examples(self, n):
    h, w = SCENE_SIZE
    rng = np.random.default_rng(1)
    for i in range(n):
      depth = np.full(SCENE_SIZE, 1.0 + i, np.float16)
      depth[0] = 0
      yield i, {
          'image': rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
          'depth': depth,
          'objects': [{
              # TFDS VOC: ((ymin - 1) / h, (xmin - 1) / w, ymax / h, xmax / w)
              # of the devkit's 1-based inclusive box (4..18, 5..24).
              'bbox': tfds.features.BBox(3 / h, 4 / w, 18 / h, 24 / w),
              'label': i % 2,
              'is_difficult': bool(i % 2),
          }],
      }


def prepare_tiny_scenes(data_dir: str) -> str:
  if not os.path.isdir(os.path.join(data_dir, TINY_SCENES_NAME)):
    MtsslTinyScenes(data_dir=data_dir).download_and_prepare()
  return data_dir
