"""Decoding image files with TensorFlow ops only (no Python per image).

The same statuses and pixels as `sources.decode_image_bytes` (OpenCV): used by
the sources that run on tf.data service workers (folders, shards). Anything
TensorFlow cannot read or decode becomes a skip status, never an error.

Typical use:

    ds = decoded_file(path, max_pixels)   # one (uint8 [H, W, 3], status)
    image, status = decode_checked(data)  # inside a dataset with `fallback`
"""

from typing import Optional, Tuple

import tensorflow as tf

from mtssl.data import sources

_PNG = b'\x89PNG\r\n\x1a\n'
_HEAD = 32  # Header bytes read for the format, size and flags.


def _head(data) -> tf.Tensor:
  """The first bytes of `data`, zero-padded: safe to slice at any header
  position."""
  return tf.strings.join([tf.strings.substr(data, 0, _HEAD),
                          tf.constant(b'\0' * _HEAD)])


def _is_png(head):
  return tf.equal(tf.strings.substr(head, 0, 8), _PNG)


def _is_jpeg(head):
  return tf.equal(tf.strings.substr(head, 0, 2), b'\xff\xd8')


def _is_webp(head):
  return (tf.equal(tf.strings.substr(head, 0, 4), b'RIFF')
          & tf.equal(tf.strings.substr(head, 8, 4), b'WEBP'))


def _uint(head, pos: int, size: int, big_endian: bool = False) -> tf.Tensor:
  """The unsigned integer of `size` bytes at `pos` of `head` (int64)."""
  raw = tf.cast(tf.io.decode_raw(tf.strings.substr(head, pos, size),
                                 tf.uint8), tf.int64)
  shifts = tf.range(size, dtype=tf.int64) * 8
  if big_endian:
    shifts = tf.reverse(shifts, [0])
  return tf.reduce_sum(tf.bitwise.left_shift(raw, shifts))


def _signed32(value):
  return tf.where(value >= 2 ** 31, value - 2 ** 32, value)


def header_pixels(data) -> tf.Tensor:
  """Width x height from a PNG, JPEG, BMP or WebP header (int64), -1 when
  unknown: read without decoding, as sources.header_pixels."""
  n = tf.strings.length(data)
  head = _head(data)
  chunk = tf.strings.substr(head, 12, 4)
  webp = _is_webp(head)
  lossless = _uint(head, 21, 4)
  # Every candidate is arithmetic on the zero-padded head; JPEG's size is in
  # a marker segment at no fixed place, so its parser runs only for JPEGs.
  sizes = [
      (_is_png(head) & (n >= 24),
       _uint(head, 16, 4, True) * _uint(head, 20, 4, True)),
      (tf.equal(tf.strings.substr(head, 0, 2), b'BM') & (n >= 26),
       tf.abs(_signed32(_uint(head, 18, 4)))
       * tf.abs(_signed32(_uint(head, 22, 4)))),
      (webp & tf.equal(chunk, b'VP8X') & (n >= 30),
       (_uint(head, 24, 3) + 1) * (_uint(head, 27, 3) + 1)),
      (webp & tf.equal(chunk, b'VP8 ') & (n >= 30),
       (_uint(head, 26, 2) % 16384) * (_uint(head, 28, 2) % 16384)),
      (webp & tf.equal(chunk, b'VP8L') & (n >= 25),
       (lossless % 16384 + 1) * (lossless // 16384 % 16384 + 1)),
  ]
  pixels = tf.constant(-1, tf.int64)
  for known, size in reversed(sizes):
    pixels = tf.where(known, size, pixels)

  def _jpeg():
    shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
    return shape[0] * shape[1]

  return tf.cond(_is_jpeg(head), _jpeg, lambda: pixels)


def _webp_has_alpha(head) -> tf.Tensor:
  """The alpha flag libwebp reports (an extended header's flag, or the
  lossless header's alpha bit), as OpenCV reads it."""
  chunk = tf.strings.substr(head, 12, 4)
  vp8x = tf.equal(chunk, b'VP8X') & tf.not_equal(
      tf.bitwise.bitwise_and(_uint(head, 20, 1), 0x10), 0)
  vp8l = tf.equal(chunk, b'VP8L') & tf.not_equal(
      tf.bitwise.bitwise_and(_uint(head, 21, 4), 1 << 28), 0)
  return vp8x | vp8l


def header_status(data) -> tf.Tensor:
  """sources.OK, or EMPTY / TRUNCATED / CORRUPT from the bytes' structure."""
  n = tf.strings.length(data)
  tail = tf.strings.regex_replace(
      tf.strings.substr(data, tf.maximum(n - 64, 0), 64), r'[\x00 \r\n\t]+$', '')
  head = _head(data)
  jpeg = _is_jpeg(head)
  png = _is_png(head)
  known = (jpeg | png | tf.equal(tf.strings.substr(head, 0, 2), b'BM')
           | tf.equal(tf.strings.substr(head, 0, 3), b'GIF') | _is_webp(head))
  eoi = tf.equal(tf.strings.substr(
      tail, tf.maximum(tf.strings.length(tail) - 2, 0), 2), b'\xff\xd9')
  last16 = tf.strings.substr(data, tf.maximum(n - 16, 0), 16)
  iend = tf.reduce_any(tf.equal(tf.strings.substr(
      tf.fill([13], last16), tf.range(13), tf.fill([13], 4)), b'IEND'))
  return tf.case([(n == 0, lambda: sources.EMPTY),
                  ((jpeg & ~eoi) | (png & ~iend), lambda: sources.TRUNCATED),
                  (~known, lambda: sources.CORRUPT)],
                 default=lambda: sources.OK)


def _decode_any(data):
  return tf.io.decode_image(data, channels=0, dtype=tf.uint8,
                            expand_animations=False)


def decode_rgb(data) -> Tuple[tf.Tensor, tf.Tensor]:
  """uint8 [H, W, 3] and its status code, as sources.decode_image_bytes.

  16-bit images keep their high byte, grayscale is replicated to RGB, alpha
  is composited over white: the folder's OpenCV pixels for the same file
  (JPEG too: libjpeg's accurate integer DCT, OpenCV's default, not
  TensorFlow's default fast one). Raises (inside tf.data) on data TensorFlow
  cannot decode.
  """
  head = _head(data)
  sixteen = _is_png(head) & tf.equal(tf.strings.substr(head, 24, 1), b'\x10')
  image = tf.case([
      (_is_jpeg(head),
       lambda: tf.io.decode_jpeg(data, dct_method='INTEGER_ACCURATE')),
      (_is_webp(head), lambda: tf.cond(
          _webp_has_alpha(head), lambda: tf.io.decode_webp(data, channels=4)[0],
          lambda: tf.io.decode_webp(data, channels=3)[0]))],
                  default=lambda: _decode_any(data))
  image.set_shape([None, None, None])
  channels = tf.shape(image)[-1]
  color = tf.cond(channels >= 3, lambda: image[..., :3],
                  lambda: tf.repeat(image[..., :1], 3, axis=-1))

  def _over_white():
    alpha = tf.cast(image[..., -1:], tf.float32) / 255.0
    mixed = tf.cast(color, tf.float32) * alpha + 255.0 * (1.0 - alpha)
    return tf.cast(tf.round(mixed), tf.uint8)

  has_alpha = tf.equal(channels, 2) | tf.equal(channels, 4)
  rgb = tf.cond(has_alpha, _over_white, lambda: color)
  rgb.set_shape([None, None, 3])
  status = tf.case([(sixteen, lambda: sources.SIXTEEN_BIT),
                    (channels < 3, lambda: sources.GRAYSCALE),
                    (has_alpha, lambda: sources.ALPHA)],
                   default=lambda: sources.OK)
  return rgb, status


def _skip(status):
  return tf.zeros([1, 1, 3], tf.uint8), tf.convert_to_tensor(status)


def decode_checked(data, max_pixels: Optional[int] = None):
  """(uint8 [H, W, 3], status): the image, or a skip status from its header
  (images whose header gives more than `max_pixels` are not decoded)."""
  status = header_status(data)
  if max_pixels is not None:
    status = tf.cond(tf.equal(status, sources.OK), lambda: tf.where(
        header_pixels(data) > max_pixels, sources.TOO_LARGE, sources.OK),
                     lambda: status)
  return tf.cond(tf.equal(status, sources.OK), lambda: decode_rgb(data),
                 lambda: _skip(status))


def fallback(ds: tf.data.Dataset, status: int) -> tf.data.Dataset:
  """`ds` with its errors dropped, or one skip of `status` if it gave nothing
  (at most one element)."""
  return ds.ignore_errors().concatenate(
      tf.data.Dataset.from_tensors(_skip(status))).take(1)


def literal_glob(path):
  return tf.strings.regex_replace(path, r'([\*\?\[])', r'[\1]')


def _existing(path) -> tf.Tensor:
  """Whether the file `path` exists (a glob of the literal name)."""
  return tf.size(tf.io.matching_files(literal_glob(path))) > 0


def decoded_file(path, max_pixels: Optional[int] = None) -> tf.data.Dataset:
  """One (image, status) of an image file: UNREADABLE where it is gone
  (deleted since it was listed, say), CORRUPT where reading or decoding
  fails.

  One dataset level (a map and its fallback): nested per-file datasets cost
  several times more per element."""
  def _read_and_decode(path):
    return tf.cond(_existing(path), lambda: decode_checked(
        tf.io.read_file(path), max_pixels), lambda: _skip(sources.UNREADABLE))

  return fallback(tf.data.Dataset.from_tensors(path).map(_read_and_decode),
                  sources.CORRUPT)
