"""`tfds:NAME[:SPLIT]`: images of a dataset TFDS has already prepared.

A split (or a slice of one, 'train[:10%]') stored as TFRecord files (TFDS's
default) is read as `tfrecord:` shards (`TfdsImageSource.as_shards`: graph
ops, any start position at once); another file format goes through tfds.
"""

import os
from typing import Optional

import tensorflow as tf

from mtssl.data import sources


class TfdsImageSource(sources.ImageSource):
  """An image dataset that TFDS has already prepared under `data_dir`.

  Nothing is downloaded: a dataset that is not prepared is a DataSourceError
  telling how to prepare it (imagenet2012 needs its archives placed in the
  TFDS manual directory, as TFDS documents).
  """

  def __init__(self, dataset: str, split: str = 'train',
               data_dir: Optional[str] = None, image_key: str = 'image'):
    super().__init__(f'tfds:{dataset}:{split}')
    self.dataset = dataset
    self.split = split
    self.data_dir = data_dir
    self.image_key = image_key

  def _builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      return tfds.builder(self.dataset, data_dir=self.data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise sources.DataSourceError(f'TFDS dataset {self.dataset!r}: '
                            f'{str(e).splitlines()[0]}') from None

  def validate(self):
    builder = self._builder()
    if not builder.is_prepared():
      raise sources.DataSourceError(
          f'TFDS dataset {self.dataset!r} is not prepared in '
          f'{builder.data_dir!r}. Prepare it first (nothing is downloaded at '
          f'run time), e.g. `tfds build {self.dataset} --data_dir=...`; '
          f'imagenet2012 needs its archives in the TFDS manual_dir.')
    split_name = self.split.split('[')[0]
    if split_name not in builder.info.splits:
      raise sources.DataSourceError(
          f'TFDS dataset {self.dataset!r} has no split {self.split!r}; it has '
          f'{sorted(builder.info.splits)}.')
    if self.image_key not in builder.info.features:
      raise sources.DataSourceError(
          f'TFDS dataset {self.dataset!r} has no feature {self.image_key!r}; '
          f'it has {sorted(builder.info.features)}.')

  def as_shards(self):
    """The prepared split's TFRecord files (the records of its slice) as a
    `tfrecord:` source (graph ops only, random access: a stream starts at
    any position at once), or None where that cannot be: another file
    format, an image feature that is not one encoded image, or a dataset
    that is not prepared (validate() then says so)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self.validate()
    except sources.DataSourceError:
      return None
    info = self._builder().info
    feature = info.features[self.image_key]
    if (info.file_format != tfds.core.file_adapters.FileFormat.TFRECORD
        or not isinstance(feature, tfds.features.Image)):
      return None
    try:
      instructions = info.splits[self.split].file_instructions
    except Exception as e:  # pylint: disable=broad-except
      raise sources.DataSourceError(
          f'TFDS split {self.split!r} of {self.dataset!r}: '
          f'{str(e).splitlines()[0]}') from None
    files = [os.fspath(i.filename) for i in instructions]
    if not files or not all(os.path.isfile(f) for f in files):
      return None
    from mtssl.data import image_records  # pylint: disable=g-import-not-at-top
    return image_records.TfrecordImageSource(
        self.name, files=files, image_key=self.image_key, name=self.name,
        ranges=[(int(i.skip), int(i.take)) for i in instructions])

  def records(self, seed, start=0, decoders=None):
    """Endless, seeded record stream (images left encoded), from `start`."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.validate()
    builder = self._builder()
    decoders = dict(decoders or {})
    decoders.setdefault(self.image_key, tfds.decode.SkipDecoding())
    read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True)
    ds = builder.as_dataset(split=self.split, shuffle_files=True,
                            decoders=decoders, read_config=read_config)
    ds = ds.repeat().enumerate().skip(start)
    return ds

  def epoch_size(self):
    try:
      return int(self._builder().info.splits[self.split].num_examples) or None
    except Exception:  # pylint: disable=broad-except
      return None

  def images(self, seed, start=0):
    counter = self.counter
    key = self.image_key
    max_pixels = self.max_image_pixels
    ds = self.records(seed, start)
    self._arm_counter()

    def _decode(k, record):
      image, ok = sources.decode_in_dataset(record[key], counter, max_pixels)
      return k, image, ok

    ds = ds.map(_decode, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.filter(lambda k, image, ok: counter.keep(ok, 'decode', count=False))
    return ds.map(lambda k, image, ok: (k, image))
