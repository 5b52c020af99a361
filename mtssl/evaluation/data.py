"""Labeled datasets of the evaluations: built-in scenes, class folders, TFDS.

Examples are dicts with `index`, `image` and the kind's labels
(classification `label`; depth `depth`; detection `boxes`, `classes`,
`difficult`). Sources are position-addressed like mtssl.data.sources; bad
input is a `DataSourceError` from `validate()`. Choices: BUILD.md, "Data
(`data.py`)".

Typical use:

    source = make_labeled_source('detection', 'tfds:voc/2007', role='train')
    source.validate()
"""

import abc
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from mtssl.data import sources
from mtssl.data import synthetic
from mtssl.data import tfds_source

DataSourceError = sources.DataSourceError
SYNTHETIC_EVAL_STREAM = 0xFFFFFFFF
KINDS = ('classification', 'depth', 'detection')
_INT64_MAX = np.iinfo(np.int64).max

# Default TFDS splits: (train, eval) per dataset, else the generic pair.
TFDS_DEFAULT_SPLITS = {
    'imagenet2012': ('train', 'validation'),
    'nyu_depth_v2': ('train', 'validation'),
    'voc/2007': ('train+validation', 'test'),
    'voc': ('train+validation', 'test'),
}
_GENERIC_SPLITS = ('train', 'test')


class LabeledSource(abc.ABC):
  """A labeled dataset of one kind with an endless train and a finite eval split."""

  kind: str

  def __init__(self, name: str):
    self.name = name
    self.counter = sources.SkipCounter(name)

  @abc.abstractmethod
  def validate(self) -> None:
    """Raises DataSourceError if the data cannot be read as this kind."""

  @property
  def num_classes(self) -> Optional[int]:
    return None

  @property
  def class_names(self) -> Optional[List[str]]:
    return None

  @abc.abstractmethod
  def train(self, seed: int, start: int = 0) -> tf.data.Dataset:
    """Endless stream of example dicts from position `start`."""

  @abc.abstractmethod
  def eval(self) -> tf.data.Dataset:
    """The finite evaluation split, in a fixed order."""

  def __repr__(self):
    return f'{type(self).__name__}({self.name!r})'


# ---------------------------------------------------------------------------
# Built-in synthetic scenes.
# ---------------------------------------------------------------------------


class SyntheticLabeled(LabeledSource):
  """Procedural scenes labeled for one protocol (see module docstring)."""

  def __init__(self, kind: str, height: int = 256, width: int = 256,
               num_classes: int = synthetic.NUM_CLASSES,
               max_objects: int = 8, eval_examples: int = 500,
               train_examples: int = 0,
               difficult_visible: float = 0.5,
               difficult_min_size: float = 0.08):
    super().__init__(f'synthetic-{kind}({height}x{width})')
    if kind not in KINDS:
      raise ValueError(f'Unknown dataset kind {kind!r}; one of {KINDS}.')
    self.kind = kind
    self.height = height
    self.width = width
    self._num_classes = num_classes
    self.max_objects = max_objects
    self.eval_examples = eval_examples
    self.train_examples = train_examples
    self._cache = {}
    self.difficult_visible = difficult_visible
    self.difficult_min_size = difficult_min_size

  def validate(self):
    if self.height < 16 or self.width < 16:
      raise DataSourceError(f'synthetic images must be at least 16x16, got '
                            f'{self.height}x{self.width}.')
    if not 1 <= self._num_classes <= synthetic.NUM_CLASSES:
      raise DataSourceError(f'synthetic data has 1..{synthetic.NUM_CLASSES} '
                            f'classes, got {self._num_classes}.')
    if self.max_objects < 1:
      raise DataSourceError(f'max_objects must be >= 1, got '
                            f'{self.max_objects}.')
    if self.train_examples < 0:
      raise DataSourceError(f'train_examples must be >= 0 (0: unlimited), got '
                            f'{self.train_examples}.')
    if self.eval_examples < 1:
      raise DataSourceError(f'the synthetic evaluation split needs at least '
                            f'one example, got {self.eval_examples}.')

  @property
  def num_classes(self):
    return None if self.kind == 'depth' else self._num_classes

  @property
  def class_names(self):
    if self.kind == 'depth':
      return None
    return list(synthetic.CLASS_NAMES[:self._num_classes])

  def render(self, stream: int, index: int):
    """The example `index` of scene stream `stream`, as numpy arrays.

    The evaluation split, and a finite training set, are rendered once and
    kept in memory.
    """
    finite = stream == SYNTHETIC_EVAL_STREAM or self.train_examples
    if not finite:
      return self._render(stream, index)
    key = (stream, index)
    cached = self._cache.get(key)
    if cached is None:
      cached = self._cache.setdefault(key, self._render(stream, index))
    return cached

  def _render(self, stream: int, index: int):
    scene = synthetic.render_scene(stream, index, self.height, self.width,
                                   max_objects=self.max_objects,
                                   num_classes=self._num_classes)
    if self.kind == 'classification':
      return scene.image, np.int64(scene.label)
    if self.kind == 'depth':
      depth = np.where(scene.depth >= synthetic.MAX_DEPTH, 0.0,
                       scene.depth).astype(np.float32)
      return scene.image, depth
    boxes = scene.boxes.astype(np.float32).reshape(-1, 4)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    difficult = ((scene.visible < self.difficult_visible)
                 | (sides < self.difficult_min_size * min(self.height,
                                                          self.width)))
    return (scene.image, boxes, scene.classes.astype(np.int64),
            difficult.astype(bool))

  def _fields(self):
    """(key, dtype, static shape) of what `render` returns, in order."""
    image = ('image', tf.uint8, [self.height, self.width, 3])
    if self.kind == 'classification':
      return [image, ('label', tf.int64, [])]
    if self.kind == 'depth':
      return [image, ('depth', tf.float32, [self.height, self.width])]
    return [image, ('boxes', tf.float32, [None, 4]),
            ('classes', tf.int64, [None]), ('difficult', tf.bool, [None])]

  def _map(self, stream):
    fields = self._fields()

    def _example(k):
      values = tf.numpy_function(lambda i: self.render(stream, int(i)), [k],
                                 [dtype for _, dtype, _ in fields],
                                 stateful=False)
      ex = {'index': k}
      for (key, _, shape), value in zip(fields, values):
        value.set_shape(shape)
        ex[key] = value
      return ex

    return _example

  def train(self, seed, start=0):
    if not 0 <= seed < 2**31:
      raise ValueError(f'seed must be in [0, 2**31), got {seed}.')
    # With a finite training set, position k shows scene k mod
    # train_examples: every epoch the same scenes in the same order (the
    # augmentations still differ, keyed by k).
    n = self.train_examples
    render = self._map(seed)

    def _example(k):
      return dict(render(k % n if n else k), index=k)

    return tf.data.Dataset.range(start, _INT64_MAX).map(
        _example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def eval(self):
    return tf.data.Dataset.range(self.eval_examples).map(
        self._map(SYNTHETIC_EVAL_STREAM), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)


# ---------------------------------------------------------------------------
# A folder of class sub-folders (classification).
# ---------------------------------------------------------------------------


class FolderClassification(LabeledSource):
  """root/<class name>/**/image files; classes are the sorted sub-folders."""

  kind = 'classification'

  def __init__(self, root: str):
    super().__init__(f'folder:{root}')
    self.root = root
    self._classes = None
    self._files = None

  def _scan(self):
    if self._files is not None:
      return
    classes = sorted(d for d in os.listdir(self.root)
                     if not d.startswith('.')
                     and os.path.isdir(os.path.join(self.root, d)))
    files, labels = [], []
    empty = []
    for label, name in enumerate(classes):
      found = sources.list_image_files(os.path.join(self.root, name))
      if not found:
        empty.append(name)
      files += found
      labels += [label] * len(found)
    self._classes, self._files, self._labels = classes, files, labels
    self._empty = empty

  def validate(self):
    if not os.path.isdir(self.root):
      raise DataSourceError(f'Classification folder {self.root!r} does not '
                            f'exist or is not a directory.')
    self._scan()
    if not self._classes:
      raise DataSourceError(
          f'Classification folder {self.root!r} has no class sub-folders '
          f'(expected {self.root}/<class name>/<images>).')
    if self._empty:
      raise DataSourceError(
          f'Classification folder {self.root!r}: class folder(s) '
          f'{", ".join(self._empty)} contain no image files '
          f'({", ".join(sources.IMAGE_EXTENSIONS)}).')

  @property
  def num_classes(self):
    self._scan()
    return len(self._classes)

  @property
  def class_names(self):
    self._scan()
    return list(self._classes)

  def _read(self, positions_to_file):
    files = tf.constant(self._files)
    labels = tf.constant(self._labels, tf.int64)
    counter = self.counter

    def _example(k):
      i = positions_to_file(k)
      image, ok = sources.decode_in_dataset(tf.io.read_file(files[i]), counter)
      return {'index': k, 'image': image, 'label': labels[i]}, ok

    return _example

  def _finish(self, ds):
    ds = ds.filter(lambda ex, ok: ok)
    return ds.map(lambda ex, ok: ex)

  def train(self, seed, start=0):
    self.validate()
    n = len(self._files)
    fn = self._read(lambda k: sources.epoch_permutation_index(k, n, seed))
    return self._finish(tf.data.Dataset.range(start, _INT64_MAX).map(
        fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))

  def eval(self):
    self.validate()
    fn = self._read(lambda k: k)
    return self._finish(tf.data.Dataset.range(len(self._files)).map(
        fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))


# ---------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------


class _JoinedSplitTfdsSource(tfds_source.TfdsImageSource):
  """TfdsImageSource whose split may join several ('train+validation')."""

  def validate(self):
    whole = self.split
    try:
      for part in whole.split('+'):
        self.split = part.strip()
        super().validate()
    finally:
      self.split = whole


class TfdsLabeled(LabeledSource):
  """A prepared TFDS dataset read as one kind of labeled example."""

  def __init__(self, kind: str, dataset: str, split: str,
               data_dir: Optional[str] = None):
    super().__init__(f'tfds:{dataset}:{split}')
    if kind not in KINDS:
      raise ValueError(f'Unknown dataset kind {kind!r}; one of {KINDS}.')
    self.kind = kind
    self.dataset = dataset
    self.split = split
    self.images_source = _JoinedSplitTfdsSource(dataset, split, data_dir)
    self.images_source.counter = self.counter
    self._info = None

  def _required_features(self) -> Dict[str, str]:
    if self.kind == 'classification':
      return {'image': 'an encoded image', 'label': 'a ClassLabel'}
    if self.kind == 'depth':
      return {'image': 'an encoded image', 'depth': 'a [H, W] depth map'}
    return {'image': 'an encoded image',
            'objects': 'a sequence of {bbox, label[, is_difficult]}'}

  def validate(self):
    # Preparation, the split(s) and the image feature.
    self.images_source.validate()
    info = self.images_source._builder().info  # pylint: disable=protected-access
    features = info.features
    for key, what in self._required_features().items():
      if key not in features:
        raise DataSourceError(
            f'TFDS dataset {self.dataset!r} has no feature {key!r} ({what}) '
            f'needed for {self.kind}; it has {sorted(features)}.')
    if self.kind == 'detection':
      objects = features['objects']
      for key in ('bbox', 'label'):
        if key not in objects.feature:
          raise DataSourceError(
              f'TFDS dataset {self.dataset!r}: objects have no {key!r}; they '
              f'have {sorted(objects.feature)}.')
    self._info = info

  def _label_feature(self):
    if self._info is None:
      self.validate()
    if self.kind == 'classification':
      return self._info.features['label']
    if self.kind == 'detection':
      return self._info.features['objects'].feature['label']
    return None

  @property
  def num_classes(self):
    feature = self._label_feature()
    return None if feature is None else int(feature.num_classes)

  @property
  def class_names(self):
    feature = self._label_feature()
    return None if feature is None else list(feature.names)

  def _convert(self, k, record):
    image, ok = sources.decode_in_dataset(record['image'], self.counter)
    ex = {'index': k, 'image': image}
    if self.kind == 'classification':
      ex['label'] = tf.cast(record['label'], tf.int64)
    elif self.kind == 'depth':
      ex['depth'] = tf.cast(record['depth'], tf.float32)
    else:
      objects = record['objects']
      size = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = tf.concat([size, size], axis=0)
      ex['boxes'] = tf.reshape(tf.cast(objects['bbox'], tf.float32) * scale,
                               [-1, 4])
      ex['classes'] = tf.cast(objects['label'], tf.int64)
      if 'is_difficult' in objects:
        ex['difficult'] = tf.cast(objects['is_difficult'], tf.bool)
      else:
        ex['difficult'] = tf.zeros_like(ex['classes'], tf.bool)
    return ex, ok

  def _finish(self, ds):
    ds = ds.map(self._convert, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.filter(lambda ex, ok: ok)
    return ds.map(lambda ex, ok: ex)

  def train(self, seed, start=0):
    self.validate()
    return self._finish(self.images_source.records(seed, start))

  def eval(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.validate()
    builder = self.images_source._builder()  # pylint: disable=protected-access
    ds = builder.as_dataset(split=self.split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    return self._finish(ds.enumerate())


# ---------------------------------------------------------------------------
# Specifications.
# ---------------------------------------------------------------------------


def default_tfds_splits(dataset: str):
  return TFDS_DEFAULT_SPLITS.get(dataset, _GENERIC_SPLITS)


def make_labeled_source(kind: str, spec: str, role: str = 'train',
                        tfds_data_dir: Optional[str] = None,
                        **synthetic_options) -> LabeledSource:
  """Parses a data specification for one protocol kind and role.

  `role` ('train' or 'eval') picks the default TFDS split when the
  specification names none. `synthetic_options` go to SyntheticLabeled.
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown dataset kind {kind!r}; one of {KINDS}.')
  if role not in ('train', 'eval'):
    raise ValueError(f'role must be train or eval, got {role!r}.')
  if not spec or spec == 'synthetic':
    return SyntheticLabeled(kind, **synthetic_options)
  prefix, _, rest = spec.partition(':')
  if prefix == 'folder' and rest:
    if kind != 'classification':
      raise DataSourceError(
          f'A folder dataset ({spec!r}) holds class sub-folders and serves '
          f'the linear protocol only; {kind} needs "synthetic" or "tfds:..."')
    return FolderClassification(os.path.expanduser(rest))
  if prefix == 'tfds' and rest:
    # Dataset names may contain '/', splits never contain ':'.
    name, _, split = rest.partition(':')
    if not split:
      train_split, eval_split = default_tfds_splits(name)
      split = train_split if role == 'train' else eval_split
    return TfdsLabeled(kind, name, split, data_dir=tfds_data_dir)
  raise DataSourceError(
      f'Unknown data specification {spec!r}: use "synthetic", '
      f'"folder:/path" (linear only) or "tfds:name[:split]".')


def eval_spec_for(train_spec: str) -> Optional[str]:
  """The evaluation split that goes with a training specification.

  synthetic -> its held-out stream; tfds:NAME[:SPLIT] -> tfds:NAME (the
  dataset's default evaluation split); a folder has none (None).
  """
  if not train_spec or train_spec == 'synthetic':
    return 'synthetic'
  prefix, _, rest = train_spec.partition(':')
  if prefix == 'tfds' and rest:
    return 'tfds:' + rest.partition(':')[0]
  return None


def describe(source: LabeledSource) -> Dict[str, object]:
  """What a metrics report records about a source."""
  out = {'name': source.name, 'kind': source.kind}
  if source.num_classes is not None:
    out['num_classes'] = source.num_classes
  return out

