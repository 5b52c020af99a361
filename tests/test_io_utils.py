"""Atomic writes: all or nothing, with ordinary permissions."""

import os
import stat

import tensorflow as tf

from mtssl.utils import io_utils


class AtomicWriteTest(tf.test.TestCase):

  def test_file_replaced_whole_with_umask_mode(self):
    path = os.path.join(self.get_temp_dir(), 'sub', 'f.json')
    io_utils.atomic_write_json(path, {'a': 1})
    io_utils.atomic_write_json(path, {'a': 2})
    with open(path) as f:
      self.assertIn('"a": 2', f.read())
    mask = os.umask(0)
    os.umask(mask)
    self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o666 & ~mask)
    self.assertEqual(os.listdir(os.path.dirname(path)), ['f.json'])

  def test_directory_appears_only_on_success(self):
    root = self.get_temp_dir()
    target = os.path.join(root, 'out')
    with self.assertRaises(RuntimeError):
      with io_utils.atomic_directory(target) as tmp:
        open(os.path.join(tmp, 'partial'), 'w').close()
        raise RuntimeError('interrupted')
    self.assertFalse(os.path.exists(target))
    self.assertEqual([n for n in os.listdir(root) if n.startswith('.out')], [])
    with io_utils.atomic_directory(target) as tmp:
      open(os.path.join(tmp, 'done'), 'w').close()
    self.assertEqual(os.listdir(target), ['done'])
    mask = os.umask(0)
    os.umask(mask)
    self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o777 & ~mask)
    with self.assertRaises(FileExistsError):
      with io_utils.atomic_directory(target):
        pass
    with io_utils.atomic_directory(target, overwrite=True) as tmp:
      open(os.path.join(tmp, 'new'), 'w').close()
    self.assertEqual(os.listdir(target), ['new'])


if __name__ == '__main__':
  tf.test.main()
