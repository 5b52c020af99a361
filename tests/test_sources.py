"""Image sources: decoding and counting bad files, determinism, resume."""

import os

import cv2
import numpy as np
import tensorflow as tf

from mtssl.data import folder_source
from mtssl.data import sources
from mtssl.data import synthetic


def write_folder(root):
  image = synthetic.synthetic_image(0, 0, 40, 48)
  os.makedirs(os.path.join(root, 'nested', 'deeper'))
  cv2.imwrite(os.path.join(root, 'a.jpg'), image[..., ::-1])
  cv2.imwrite(os.path.join(root, 'nested', 'b.png'), image[..., ::-1])
  cv2.imwrite(os.path.join(root, 'nested', 'deeper', 'c.PNG'), image[..., ::-1])
  cv2.imwrite(os.path.join(root, 'gray.png'), image[..., 0])
  cv2.imwrite(os.path.join(root, 'alpha.png'),
              np.dstack([image[..., ::-1], np.full(image.shape[:2], 0, np.uint8)]))
  cv2.imwrite(os.path.join(root, 'deep16.png'),
              image[..., ::-1].astype(np.uint16) * 257)
  open(os.path.join(root, 'empty.jpg'), 'wb').close()
  with open(os.path.join(root, 'corrupt.png'), 'wb') as f:
    f.write(b'GIF87a: neither a GIF nor any other image')
  with open(os.path.join(root, 'a.jpg'), 'rb') as f:
    data = f.read()
  with open(os.path.join(root, 'truncated.jpg'), 'wb') as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(root, 'readme.txt'), 'w') as f:
    f.write('not an image')
  return image


class DecodeTest(tf.test.TestCase):

  def test_every_kind_of_file(self):
    root = self.get_temp_dir()
    image = write_folder(root)
    expect = {
        'a.jpg': sources.OK, 'nested/b.png': sources.OK,
        'gray.png': sources.GRAYSCALE, 'alpha.png': sources.ALPHA,
        'deep16.png': sources.SIXTEEN_BIT, 'empty.jpg': sources.EMPTY,
        'corrupt.png': sources.CORRUPT, 'truncated.jpg': sources.TRUNCATED,
    }
    for name, status in expect.items():
      with open(os.path.join(root, name), 'rb') as f:
        decoded, got = sources.decode_image_bytes(f.read())
      self.assertEqual(got, status, name)
      if status in sources.SKIPPED:
        self.assertIsNone(decoded)
      else:
        self.assertEqual(decoded.shape, image.shape, name)
        self.assertEqual(decoded.dtype, np.uint8)
    with open(os.path.join(root, 'nested', 'b.png'), 'rb') as f:
      self.assertAllEqual(sources.decode_image_bytes(f.read())[0], image)
    with open(os.path.join(root, 'alpha.png'), 'rb') as f:
      # Fully transparent pixels composite over white.
      self.assertAllEqual(sources.decode_image_bytes(f.read())[0],
                          np.full_like(image, 255))
    with open(os.path.join(root, 'deep16.png'), 'rb') as f:
      self.assertAllEqual(sources.decode_image_bytes(f.read())[0], image)


class FolderSourceTest(tf.test.TestCase):

  def test_skips_and_counts_and_never_crashes(self):
    root = self.get_temp_dir()
    write_folder(root)
    source = sources.make_image_source(f'folder:{root}')
    source.validate()
    self.assertLen(source.files, 9)  # readme.txt is not an image file
    items = list(source.images(seed=1).take(30).as_numpy_iterator())
    self.assertLen(items, 30)
    self.assertTrue(all(im.shape[-1] == 3 for _, im in items))
    counts = source.counter.snapshot()
    for reason in ('skipped_empty', 'skipped_corrupt', 'skipped_truncated',
                   'converted_grayscale', 'converted_alpha', 'converted_16bit'):
      self.assertGreater(counts.get(reason, 0), 0, reason)
    # 6 of 9 files decode, so 30 images take 5 epochs: the positions of the
    # kept images skip those of the bad files.
    positions = [int(k) for k, _ in items]
    self.assertEqual(positions, sorted(positions))
    self.assertGreater(positions[-1], 30)

  def test_deterministic_reshuffled_per_epoch_and_resumable(self):
    root = self.get_temp_dir()
    write_folder(root)
    source = folder_source.FolderImageSource(root)
    run = lambda seed, start=0: [(int(k), im.tobytes()) for k, im in
                                 source.images(seed, start).take(12)
                                 .as_numpy_iterator()]
    first = run(3)
    self.assertEqual(first, run(3))
    self.assertNotEqual([x[1] for x in first], [x[1] for x in run(4)])
    resumed = run(3, start=first[4][0] + 1)
    self.assertEqual(resumed[:7], first[5:])

  def test_missing_and_empty_folders_are_clear_errors(self):
    with self.assertRaisesRegex(sources.DataSourceError, 'does not exist'):
      sources.make_image_source('folder:/definitely/not/here').validate()
    empty = self.get_temp_dir()
    with self.assertRaisesRegex(sources.DataSourceError, 'contains no image'):
      sources.make_image_source(f'folder:{empty}').validate()
    with self.assertRaisesRegex(sources.DataSourceError, 'Unknown data source'):
      sources.make_image_source('http://example.com/images')


class SyntheticSourceTest(tf.test.TestCase):

  def test_matches_the_generator_and_resumes(self):
    source = sources.make_image_source('synthetic', synthetic_size=(32, 40))
    items = list(source.images(seed=5, start=3).take(2).as_numpy_iterator())
    self.assertEqual([int(k) for k, _ in items], [3, 4])
    self.assertAllEqual(items[0][1], synthetic.synthetic_image(5, 3, 32, 40))

  def test_tfds_not_prepared_is_a_clear_error(self):
    source = sources.make_image_source(
        'tfds:imagenet2012:validation', tfds_data_dir=self.get_temp_dir())
    with self.assertRaisesRegex(sources.DataSourceError, 'not prepared'):
      source.validate()


class SkipCounterTest(tf.test.TestCase):

  def test_counted_filter_and_note_inside_tf_data(self):
    counter = sources.SkipCounter('t')
    ds = tf.data.Dataset.range(10).filter(
        lambda x: counter.keep(x % 3 != 0, 'multiple_of_3'))
    ds = ds.map(lambda x: counter.note(x > 7, 'large', x))
    self.assertEqual(list(ds.as_numpy_iterator()), [1, 2, 4, 5, 7, 8])
    self.assertEqual(counter.snapshot(), {'multiple_of_3': 4, 'large': 1})


if __name__ == '__main__':
  tf.test.main()
