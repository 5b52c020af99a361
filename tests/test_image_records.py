"""tfrecord: image shards: graph-only decoding, counted skips, shard writing,
resume at any position (also through the trainer)."""

import os

import cv2
import numpy as np
import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.data import graph_decode
from mtssl.data import image_records
from mtssl.data import problems
from mtssl.data import sources
from mtssl.data import synthetic
from mtssl.tasks import col
from mtssl.tasks import ex
from mtssl.tasks import rp
from mtssl.training import trainer as trainer_lib
from tests import real_data
from tests import test_sources


def decoded_bytes(data, max_pixels=None):
  """One (image, status) of encoded bytes, as a source's per-element dataset
  decodes them (CORRUPT where TensorFlow's decoder fails)."""
  return graph_decode.fallback(tf.data.Dataset.from_tensors(data).map(
      lambda d: graph_decode.decode_checked(d, max_pixels)), sources.CORRUPT)


def decode_graph(payloads):
  """[(image, status)] of records holding `payloads`, through the graph path."""
  records = [image_records.serialize_image(p) for p in payloads]
  ds = tf.data.Dataset.from_tensor_slices(records).flat_map(
      lambda r: decoded_bytes(image_records.parse_image(r)))
  return [(image.numpy(), int(status)) for image, status in ds]


def write_shard(path, payloads):
  with tf.io.TFRecordWriter(path) as writer:
    for data in payloads:
      writer.write(image_records.serialize_image(data))


def stream(source, seed, start, n):
  return [(int(k), image.numpy(), counts.numpy())
          for k, image, counts in source.counted_images(seed, start).take(n)]


class DecodeTest(tf.test.TestCase):

  def test_graph_decode_matches_the_python_decode(self):
    root = self.get_temp_dir()
    test_sources.write_folder(root)
    names = ('a.jpg', 'nested/b.png', 'gray.png', 'alpha.png', 'deep16.png',
             'empty.jpg', 'corrupt.png', 'truncated.jpg')
    payloads = []
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        payloads.append(f.read())
    for name, data, (image, status) in zip(names, payloads,
                                           decode_graph(payloads)):
      expected, expected_status = sources.decode_image_bytes(data)
      self.assertEqual(status, expected_status, name)
      if expected is None:
        continue
      self.assertEqual(image.shape, expected.shape, name)
      # The same pixels, JPEG included (libjpeg's accurate integer DCT on
      # both sides; TensorFlow's default fast DCT was up to 8 levels off).
      self.assertAllEqual(image, expected, msg=name)

  def test_real_photos_decode_to_the_folder_sources_pixels(self):
    # JPEGs from two packages, RGB, gray, RGBA, palette and 16-bit PNGs.
    payloads = []
    for name in real_data.PHOTO_NAMES:
      with open(real_data.photo_path(name), 'rb') as f:
        payloads.append(f.read())
    for name, data, (image, status) in zip(real_data.PHOTO_NAMES, payloads,
                                           decode_graph(payloads)):
      expected, expected_status = sources.decode_image_bytes(data)
      self.assertEqual(status, expected_status, name)
      self.assertAllEqual(image, expected, msg=name)


  def test_webp_bmp_and_header_sizes_match_the_python_decode(self):
    image = synthetic.synthetic_image(0, 3, 40, 48)[..., ::-1]
    alpha = np.dstack([image, np.arange(40 * 48).reshape(40, 48) % 256]
                      ).astype(np.uint8)
    payloads = {
        'lossy.webp': cv2.imencode('.webp', image,
                                   [cv2.IMWRITE_WEBP_QUALITY, 80])[1],
        'lossless.webp': cv2.imencode('.webp', image,
                                      [cv2.IMWRITE_WEBP_QUALITY, 101])[1],
        'lossless_alpha.webp': cv2.imencode(
            '.webp', alpha, [cv2.IMWRITE_WEBP_QUALITY, 101])[1],
        'lossy_alpha.webp': cv2.imencode('.webp', alpha,
                                         [cv2.IMWRITE_WEBP_QUALITY, 80])[1],
        'a.bmp': cv2.imencode('.bmp', image)[1],
        'a.png': cv2.imencode('.png', image)[1],
        'a.jpg': cv2.imencode('.jpg', image)[1],
    }
    for name, data in payloads.items():
      data = data.tobytes()
      expected, expected_status = sources.decode_image_bytes(data)
      (got, status), = list(decoded_bytes(data).as_numpy_iterator())
      self.assertEqual(status, expected_status, name)
      self.assertAllEqual(got, expected, msg=name)
      self.assertEqual(int(graph_decode.header_pixels(data)), 40 * 48, name)
      (_, status), = list(decoded_bytes(
          data, max_pixels=40 * 48 - 1).as_numpy_iterator())
      self.assertEqual(status, sources.TOO_LARGE, name)
    self.assertEqual(int(graph_decode.header_pixels(b'GIF89a')), -1)


class ShardsTest(tf.test.TestCase):

  def test_make_shards_counts_skips_and_resumes(self):
    root = os.path.join(self.get_temp_dir(), 'images')
    out = os.path.join(self.get_temp_dir(), 'shards')
    test_sources.write_folder(root)
    summary = image_records.make_shards(root, out, records_per_shard=4,
                                        log=lambda _: None)
    self.assertEqual(summary['files'], 9)
    self.assertEqual(summary['records'], 6)
    self.assertEqual(summary['shards'], 3)
    self.assertEqual(summary['skipped'], {'skipped_empty': 1,
                                          'skipped_corrupt': 1,
                                          'skipped_truncated': 1})
    self.assertIsNone(summary['classes'])  # a.jpg lies in the root
    shards = image_records.find_shards(out)
    self.assertLen(shards, 3)
    mtimes = [os.stat(s).st_mtime_ns for s in shards]
    again = image_records.make_shards(root, out, records_per_shard=4,
                                      log=lambda _: None)
    self.assertEqual((again['shards_written'], again['shards_kept']), (0, 3))
    self.assertEqual(again['skipped'], summary['skipped'])
    self.assertEqual([os.stat(s).st_mtime_ns for s in shards], mtimes)
    # A shard lost (e.g. an interrupted run) is written again.
    os.remove(shards[1])
    third = image_records.make_shards(root, out, records_per_shard=4,
                                      log=lambda _: None)
    self.assertEqual((third['shards_written'], third['shards_kept']), (1, 2))
    self.assertEqual(sorted(os.listdir(out)), sorted(
        [os.path.basename(s) + e for s in shards
         for e in ('', '.index', '.json')] + ['summary.json']))
    source = sources.make_image_source('tfrecord:' + out)
    source.validate()
    self.assertLen(source, 6)

  def test_labels_from_subfolders(self):
    root = os.path.join(self.get_temp_dir(), 'images')
    image = test_sources.synthetic.synthetic_image(0, 0, 24, 24)
    for cls in ('cat', 'dog'):
      os.makedirs(os.path.join(root, cls))
      test_sources.cv2.imwrite(os.path.join(root, cls, 'x.png'), image)
    out = os.path.join(self.get_temp_dir(), 'shards')
    summary = image_records.make_shards(root, out, log=lambda _: None)
    self.assertEqual(summary['classes'], ['cat', 'dog'])
    labels = sorted(
        tf.train.Example.FromString(r.numpy()).features.feature[
            image_records.LABEL_KEY].int64_list.value[0]
        for r in tf.data.TFRecordDataset(image_records.find_shards(out)))
    self.assertEqual(labels, [0, 1])

  def test_missing_shards_are_a_clear_error(self):
    with self.assertRaisesRegex(sources.DataSourceError, 'No TFRecord shards'):
      sources.make_image_source(
          'tfrecord:' + os.path.join(self.get_temp_dir(), 'none')).validate()


class TfrecordSourceTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    root = self.get_temp_dir()
    test_sources.write_folder(root)

    def read(name):
      with open(os.path.join(root, name), 'rb') as f:
        return f.read()

    self.good = read('nested/b.png')
    self.shards = os.path.join(root, 'shards')
    os.makedirs(self.shards)
    # Shard 0: good, corrupt, good, empty, truncated, gray, good.
    write_shard(os.path.join(self.shards, 'a.tfrecord'),
                [self.good, read('corrupt.png'), self.good, b'',
                 read('truncated.jpg'), read('gray.png'), self.good])
    # Shard 1: good, then a record whose bytes are damaged after writing
    # (CRC mismatch), then good.
    path = os.path.join(self.shards, 'b.tfrecord')
    write_shard(path, [self.good, self.good, self.good])
    offsets, _ = image_records.scan_offsets(path)
    with open(path, 'r+b') as f:
      f.seek(int(offsets[1]) + 40)
      f.write(b'\x00' * 8)

  def test_skips_are_counted_and_decodes_are_graph_only(self):
    source = sources.make_image_source('tfrecord:' + self.shards)
    self.assertTrue(problems.is_graph_only(source))
    source.validate()
    self.assertLen(source, 10)
    epoch = stream(source, seed=3, start=0, n=6)
    totals = sum(counts for _, _, counts in epoch)
    reasons = {source.counter.reasons[c]: int(v)
               for c, v in enumerate(totals) if v}
    # 10 records: 4 skips (corrupt, damaged CRC, empty, truncated) and 6 kept,
    # one of them converted from grayscale; each kept one carries its status.
    self.assertEqual(reasons, {'ok': 5, 'converted_grayscale': 1,
                               'skipped_corrupt': 2, 'skipped_empty': 1,
                               'skipped_truncated': 1})
    for _, image, _ in epoch:
      self.assertEqual(image.shape[-1], 3)
    # The graph never calls into Python.
    graph = source.counted_images(3).take(1)._as_serialized_graph()  # pylint: disable=protected-access
    self.assertNotIn(b'PyFunc', graph.numpy())

  def test_deleted_shard_is_a_counted_skip_not_a_hang(self):
    source = sources.make_image_source('tfrecord:' + self.shards)
    source.validate()
    os.remove(os.path.join(self.shards, 'b.tfrecord'))
    epoch = stream(source, seed=0, start=0, n=4)
    totals = sum(counts for _, _, counts in epoch)
    # 3 records of the deleted shard + 3 bad ones of the other are skipped.
    self.assertEqual(int(totals[sources.CORRUPT]), 1 + 3)

  def test_resumes_at_any_position(self):
    source = sources.make_image_source('tfrecord:' + self.shards)
    full = stream(source, seed=1, start=0, n=15)
    resumed = stream(source, seed=1, start=full[9][0], n=5)
    self.assertEqual([k for k, _, _ in resumed], [k for k, _, _ in full[9:14]])
    for (_, a, _), (_, b, _) in zip(resumed, full[9:14]):
      self.assertAllEqual(a, b)
    # A position far away starts as fast: no record before it is read.
    far = stream(source, seed=1, start=10**12, n=1)
    self.assertGreaterEqual(far[0][0], 10**12)

  def test_task_batches_carry_counts_to_the_consumer(self):
    source = sources.make_image_source('tfrecord:' + self.shards)
    # About 3,500 pixels: smaller than rp's minimum side, so every image is
    # upscaled (an event the task counts with counter.note).
    task = rp.RelativePositionTask(rp.RPConfig(
        batch_size=2, patch_size=32, gap=16, jitter=3, min_pixels=3000,
        max_pixels=4000, unit_depths=(32, 16), unit_bottleneck=8,
        fc_bottleneck=16))
    features, _ = next(iter(task.make_dataset(source, 2, seed=0)))
    self.assertAllEqual(features['upscaled'], [True, True])
    self.assertIn(problems.PROBLEMS_KEY, features)
    problems.take_counts(features, source.counter)
    self.assertNotIn(problems.PROBLEMS_KEY, features)
    counts = source.counter.snapshot()
    self.assertEqual(counts[rp.UPSCALE_REASON], 2)
    self.assertEqual(sum(v for k, v in counts.items()
                         if not k.startswith('skipped') and k != rp.UPSCALE_REASON),
                     2)

  def test_ex_batches_carry_counts(self):
    source = sources.make_image_source('tfrecord:' + self.shards)
    task = ex.ExemplarTask(ex.ExConfig(**dict(ex.ExemplarTask.cpu_overrides,
                                              batch_size=2)))
    features, _ = next(iter(task.make_dataset(source, 2, seed=0)))
    problems.take_counts(features, source.counter)
    self.assertNotIn(problems.PROBLEMS_KEY, features)
    # One decode status per example of the batch, besides any skips.
    self.assertEqual(sum(v for k, v in source.counter.snapshot().items()
                         if not k.startswith('skipped')), 2)

  def test_counts_in_process_for_consumers_that_do_not_take_them(self):
    # col on the cluster workers: the grayscale image col drops is counted
    # there, with the skips of the source.
    source = sources.make_image_source('tfrecord:' + self.shards)
    task = col.ColorizationTask(col.ColConfig(batch_size=2, image_size=32,
                                              head_widths=(16, 16)))
    ds = problems.count_in_process(task.make_dataset(source, 2, seed=0),
                                   source.counter)
    # 5 colour images per epoch: 3 batches pass the grayscale one.
    for features, _ in ds.take(3):
      self.assertNotIn(problems.PROBLEMS_KEY, features)
    counts = source.counter.snapshot()
    self.assertGreaterEqual(counts[col.SKIP_REASON], 1)
    self.assertGreaterEqual(counts['skipped_corrupt'], 2)


class TfdsShardsTest(tf.test.TestCase):
  """A whole TFDS split prepared as TFRecord files is read as shards."""

  def test_prepared_split_is_read_by_record_index(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from tests import eval_fixtures  # pylint: disable=g-import-not-at-top
    data_dir = eval_fixtures.prepare_tiny_tfds(self.get_temp_dir())
    name = eval_fixtures.TINY_TFDS_NAME
    source = sources.make_image_source(f'tfds:{name}:train',
                                       tfds_data_dir=data_dir)
    self.assertIsInstance(source, image_records.TfrecordImageSource)
    self.assertEqual(source.name, f'tfds:{name}:train')
    self.assertTrue(problems.is_graph_only(source))
    # One epoch is every image of the split once, with TFDS's own pixels.
    want = sorted(example['image'].tobytes() for example in tfds.as_numpy(
        tfds.load(name, split='train', data_dir=data_dir)))
    epoch = stream(source, seed=2, start=0, n=len(want) + 5)
    self.assertEqual(sorted(image.tobytes()
                            for _, image, _ in epoch[:len(want)]), want)
    resumed = stream(source, seed=2, start=len(want) + 1, n=4)
    for (k, a, _), (j, b, _) in zip(resumed, epoch[len(want) + 1:]):
      self.assertEqual(k, j)
      self.assertAllEqual(a, b)
    # The offsets were kept beside the split's file for the next reader.
    self.assertTrue(all(os.path.isfile(f + image_records.INDEX_SUFFIX)
                        for f in source.index[0]))
    # A slice of a split is read as shards too: an epoch is its images.
    half = sources.make_image_source(f'tfds:{name}:train[25%:75%]',
                                     tfds_data_dir=data_dir)
    self.assertIsInstance(half, image_records.TfrecordImageSource)
    want = sorted(example['image'].tobytes() for example in tfds.as_numpy(
        tfds.load(name, split='train[25%:75%]', data_dir=data_dir)))
    self.assertBetween(len(want), 1, len(epoch) - 6)
    self.assertLen(half, len(want))
    self.assertEqual(sorted(image.tobytes() for _, image, _ in stream(
        half, seed=2, start=0, n=len(want))), want)


class ResumeThroughTrainerTest(tf.test.TestCase):

  def test_resumed_run_takes_the_next_example_of_the_uninterrupted_run(self):
    root = os.path.join(self.get_temp_dir(), 'images')
    test_sources.write_folder(root)
    shards = os.path.join(self.get_temp_dir(), 'shards')
    image_records.make_shards(root, shards, records_per_shard=2,
                              log=lambda _: None)
    rp_config = rp.RPConfig(
        batch_size=2, patch_size=32, gap=16, jitter=3, min_pixels=20000,
        max_pixels=30000, unit_depths=(32, 16), unit_bottleneck=8,
        fc_bottleneck=16)

    def config(steps):
      return configs.TrainConfig(
          tasks={'rp': configs.TaskRun(config=rp_config,
                                       data='tfrecord:' + shards)},
          model_dir=os.path.join(self.get_temp_dir(), 'run'),
          trunk='resnet_v2_tiny', output_stride=8, steps=steps,
          checkpoint_every=1000, log_every=1000, summary_every=1000,
          image_summary_every=1000)

    first = trainer_lib.Trainer(config(2))
    first.train()
    resumed = trainer_lib.Trainer(config(3)).setup()
    self.assertIsNotNone(resumed.run.resumed_from)
    features, _ = resumed._pending['rp']  # pylint: disable=protected-access
    task = rp.RelativePositionTask(rp_config)
    straight = sources.make_image_source('tfrecord:' + shards)
    batches = iter(task.make_dataset(straight, 2, seed=resumed.run.task_seed('rp')))
    for _ in range(2):
      next(batches)
    expected, _ = next(batches)
    self.assertAllEqual(features['index'], expected['index'])
    self.assertAllEqual(features['patches'], expected['patches'])
    resumed.close_inputs()
