"""Sources that stop yielding, oversized images and files deleted mid-run:
a named error or a counted skip, never an endless loop or a crash."""

import os
import struct
import zlib

import cv2
import numpy as np
import tensorflow as tf

from mtssl.data import image_records
from mtssl.data import motion_sources
from mtssl.data import sources
from mtssl.data import synthetic
from mtssl.tasks import col
from tests import tool_runner


def write_images(root, count, gray=False, corrupt=False):
  os.makedirs(root, exist_ok=True)
  for i in range(count):
    path = os.path.join(root, f'{i:02d}.png')
    if corrupt:
      with open(path, 'wb') as f:
        f.write(b'not a PNG at all ' * 4)
      continue
    image = synthetic.synthetic_image(0, i, 40, 48)
    cv2.imwrite(path, image[..., 0] if gray else image[..., ::-1])
  return root


def png_header_claiming(width, height):
  """A small real PNG whose IHDR (CRC fixed) claims width x height."""
  ok, data = cv2.imencode('.png', np.zeros((4, 4, 3), np.uint8))
  assert ok
  data = bytearray(data.tobytes())
  ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
  ihdr[4:12] = struct.pack('>II', width, height)
  data[12:29] = ihdr
  data[29:33] = struct.pack('>I', zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
  return bytes(data)


def drain(dataset, counter, limit=10_000):
  """Iterates `dataset` up to `limit` elements; raises the source's error."""
  n = 0
  try:
    for _ in dataset.take(limit):
      n += 1
  except tf.errors.OpError as e:
    sources.raise_if_stalled(e, counter)
    raise
  return n


class StalledSourceTest(tf.test.TestCase):

  def test_folder_of_only_corrupt_images_is_an_error(self):
    root = write_images(os.path.join(self.get_temp_dir(), 'bad'), 3,
                        corrupt=True)
    source = sources.make_image_source(f'folder:{root}')
    # The counts travel with the elements; at the stop, the message has them.
    with self.assertRaisesRegex(
        sources.DataSourceError,
        rf'folder:{root}: 5 elements in a row skipped .*whole epoch of 3.*'
        rf'counts so far: skipped_corrupt 5\.'):
      drain(source.images(seed=0), source.counter)

  def test_the_bound_is_a_setting(self):
    root = write_images(os.path.join(self.get_temp_dir(), 'bad'), 30,
                        corrupt=True)
    source = sources.make_image_source(f'folder:{root}')
    source.max_consecutive_skips = 7
    with self.assertRaisesRegex(sources.DataSourceError,
                                'max_consecutive_skips=7'):
      drain(source.images(seed=0), source.counter)

  def test_some_bad_files_never_stop_a_source(self):
    # 2 of 3 files bad: at most 4 skips in a row across an epoch boundary,
    # below the bound of 2n - 1 = 5.
    root = write_images(os.path.join(self.get_temp_dir(), 'mixed'), 1)
    write_images(os.path.join(root, 'bad'), 2, corrupt=True)
    source = sources.make_image_source(f'folder:{root}')
    self.assertEqual(drain(source.images(seed=0), source.counter, 200), 200)
    # Each epoch has 2 bad files; those after the last image taken are
    # counted with the next one.
    self.assertGreaterEqual(source.counter.problems()['skipped_corrupt'], 398)

  def test_colorization_on_only_grayscale_images_is_an_error(self):
    root = write_images(os.path.join(self.get_temp_dir(), 'gray'), 4,
                        gray=True)
    task = col.ColorizationTask(col.ColConfig(image_size=32), load_prior=False)
    source = task.make_source(f'folder:{root}')
    with self.assertRaisesRegex(sources.DataSourceError,
                                'elements in a row skipped'):
      drain(task.examples(source, seed=0), source.counter)
    # The prior estimator reads the same stream.
    source = task.make_source(f'folder:{root}')
    with self.assertRaisesRegex(tf.errors.OpError, '7 elements in a row'):
      col.estimate_prior(task, source, 10)

  def test_prior_estimation_on_grayscale_images_ends_with_one_line(self):
    # This used to loop forever (the suite's per-test timeout ends a hang).
    root = write_images(os.path.join(self.get_temp_dir(), 'gray'), 4,
                        gray=True)
    output = os.path.join(self.get_temp_dir(), 'prior.npy')
    status, _, stderr = tool_runner.run_tool(
        'estimate_color_prior.py', f'--source=folder:{root}',
        '--num_images=4', '--image_size=32', f'--output={output}')
    self.assertEqual(status, 2, stderr[-2000:])
    errors = [l for l in stderr.splitlines() if l.startswith('error:')]
    self.assertLen(errors, 1, stderr[-2000:])
    self.assertIn(f'folder:{root}: 7 elements in a row skipped', errors[0])
    self.assertFalse(os.path.exists(output))

  def test_image_shards_of_only_corrupt_images_are_an_error(self):
    # Graph ops only: the count of skips in a row travels in the pipeline.
    shard = os.path.join(self.get_temp_dir(), 'images.tfrecord')
    with tf.io.TFRecordWriter(shard) as writer:
      for i in range(3):
        writer.write(image_records.serialize_image(b'not an image %d' % i))
    source = sources.make_image_source(f'tfrecord:{shard}')
    with self.assertRaisesRegex(
        sources.DataSourceError,
        rf'^tfrecord:{shard}: 5 elements in a row skipped \(a whole epoch '
        rf'of 3 elements gave nothing\)'):
      drain(source.images(seed=0), source.counter)

  def test_motion_shards_of_unparsable_records_are_an_error(self):
    shard = os.path.join(self.get_temp_dir(), 'clips-00000.tfrecord')
    with tf.io.TFRecordWriter(shard) as writer:
      for i in range(3):
        writer.write(f'not a tf.Example {i}'.encode())
    source = motion_sources.make_motion_source(f'tfrecord:{shard}')
    source.validate()
    with self.assertRaisesRegex(sources.DataSourceError,
                                'whole epoch of 3 elements gave nothing'):
      drain(source.examples(seed=0), source.counter)


class OversizedAndVanishingTest(tf.test.TestCase):

  def test_pixel_cap_skips_before_decoding(self):
    image = np.zeros((37, 53, 3), np.uint8)
    for ext in ('.png', '.jpg', '.bmp', '.webp'):
      self.assertEqual(sources.header_pixels(cv2.imencode(ext, image)[1]
                                             .tobytes()), 37 * 53, ext)
    huge = png_header_claiming(12000, 9000)
    self.assertEqual(sources.header_pixels(huge), 12000 * 9000)
    image, status = sources.decode_image_bytes(huge,
                                               sources.MAX_IMAGE_PIXELS)
    self.assertIsNone(image)
    self.assertEqual(status, sources.TOO_LARGE)
    root = write_images(os.path.join(self.get_temp_dir(), 'images'), 3)
    with open(os.path.join(root, 'huge.png'), 'wb') as f:
      f.write(huge)
    source = sources.make_image_source(f'folder:{root}')
    items = list(source.images(seed=0).take(9).as_numpy_iterator())
    self.assertLen(items, 9)
    # 9 images take 3 epochs or more: the huge file came before at least 2 of
    # them (its counts travel with the next image).
    problems = source.counter.problems()
    self.assertEqual(list(problems), ['skipped_too_large'])
    self.assertGreaterEqual(problems['skipped_too_large'], 2)
    # The cap is a setting: 40x48 images are above a 1000-pixel cap.
    small_cap = sources.make_image_source(f'folder:{root}')
    small_cap.max_image_pixels = 1000
    with self.assertRaisesRegex(sources.DataSourceError,
                                r'counts so far: skipped_too_large \d+'):
      drain(small_cap.images(seed=0), small_cap.counter)

  def test_file_deleted_mid_run_is_a_counted_skip(self):
    root = write_images(os.path.join(self.get_temp_dir(), 'images'), 4)
    source = sources.make_image_source(f'folder:{root}')
    iterator = iter(source.images(seed=0))
    for _ in range(2):
      next(iterator)
    os.remove(os.path.join(root, '02.png'))
    # The pipeline reads ahead (up to its interleave cycle of 16 files and a
    # prefetch buffer), so the skip shows within a bounded number of images.
    for _ in range(200):
      next(iterator)
      if source.counter.problems().get('skipped_unreadable'):
        break
    self.assertGreater(source.counter.problems()['skipped_unreadable'], 0)


if __name__ == '__main__':
  tf.test.main()
