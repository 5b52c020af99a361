"""`folder:/path`: every image file below a folder, read and decoded in graph
ops (so its pipelines run on tf.data service workers).

The file list is made once, in the process that builds the pipeline, and
travels in the dataset's graph; a file deleted since is a counted skip
(`skipped_unreadable`).
"""

import os

import tensorflow as tf

from mtssl.data import graph_decode
from mtssl.data import problems
from mtssl.data import sources


class FolderImageSource(sources.ImageSource):
  """Every image file below a folder (nested folders included), endlessly.

  Each epoch visits every file once in an order shuffled by (seed, epoch).
  Pixels and skip reasons are those of `sources.decode_image_bytes`.
  """

  def __init__(self, root: str, cycle_length: int = 16):
    super().__init__(f'folder:{root}')
    self.root = root
    self.cycle_length = cycle_length
    self.counter = problems.ProblemCounter(self.name)
    self._files = None

  @property
  def files(self):
    if self._files is None:
      self._files = sources.list_image_files(self.root)
    return self._files

  def validate(self):
    if not os.path.isdir(self.root):
      raise sources.DataSourceError(
          f'Image folder {self.root!r} does not exist or is not a directory.')
    if not self.files:
      raise sources.DataSourceError(
          f'Image folder {self.root!r} contains no image files '
          f'({", ".join(sources.IMAGE_EXTENSIONS)}).')

  def epoch_size(self):
    return len(self.files)

  def counted_images(self, seed, start=0) -> tf.data.Dataset:
    """Endless (index, uint8 [H, W, 3], int64 counts [MAX_REASONS]) from
    `start`; counts hold this file's decode status and the skips just
    before it."""
    self.validate()
    self._arm_counter()
    files = tf.constant(self.files)
    max_pixels = self.max_image_pixels
    return problems.counted_stream(
        self, seed, start,
        lambda i: graph_decode.decoded_file(files[i], max_pixels),
        self.cycle_length)

  def images(self, seed, start=0):
    """(index, image); counts go to the counter through numpy_function (use
    `counted_images` where no Python may run)."""
    return problems.count_with(self.counter, self.counted_images(seed, start))
