"""The trunk as a servable feature extractor (`FeatureExtractor`, a tf.Module).

`serving_default` takes encoded images, `from_pixels` float RGB in [0, 255];
both return `block3` and its adaptive 3x3 max-pool `pooled`. The module also
follows TF Hub's Reusable SavedModel API. Signatures and bad-input errors:
README, "Signatures"; written by mtssl.deploy.saved_model.
"""

from typing import Dict, Sequence, Tuple

import tensorflow as tf

from mtssl.ops import pooling
from mtssl.ops.preprocessing import vgg_preprocess

SERVING_SIGNATURE = 'serving_default'
PIXELS_SIGNATURE = 'from_pixels'
IMAGES_INPUT = 'images'
PIXELS_INPUT = 'pixels'
BLOCK3_OUTPUT = 'block3'
POOLED_OUTPUT = 'pooled'
POOLED_GRID = (3, 3)
DEFAULT_IMAGE_SIZE = (256, 256)

# File signatures tf.io.decode_image recognises. WebP is RIFF????WEBP.
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a', b'GIF89a', b'BM')
_HEAD_BYTES = 12
# Base64 of the JPEG and PNG signatures: a client that sent the text of a
# base64 encoding instead of the bytes.
_BASE64_MAGIC = (b'/9j/', b'iVBORw0KGgo')


def _starts_with(data, prefix: bytes):
  return tf.equal(tf.strings.substr(data, 0, len(prefix)), prefix)


def _is_known_image(head):
  """head: the first _HEAD_BYTES bytes of an element, zero padded."""
  checks = [_starts_with(head, m) for m in _MAGIC]
  checks.append(tf.logical_and(
      _starts_with(head, b'RIFF'),
      tf.equal(tf.strings.substr(head, 8, 4), b'WEBP')))
  return tf.reduce_any(tf.stack(checks))


def _head(data):
  padded = tf.strings.join([data, b'\0' * _HEAD_BYTES])
  return tf.strings.substr(padded, 0, _HEAD_BYTES)


def check_encoded_image(data, index, input_name: str = IMAGES_INPUT):
  """An Assert op naming element `index` of `input_name` if it is no image."""
  head = _head(data)
  looks_base64 = tf.reduce_any(tf.stack(
      [_starts_with(head, m) for m in _BASE64_MAGIC]))
  hint = tf.where(
      looks_base64,
      tf.constant('; it looks like base64 text: send the decoded bytes '
                  '(REST: {"b64": "<base64>"})'), tf.constant(''))
  message = tf.strings.join([tf.strings.format(
      input_name + '[{}] is not an encoded JPEG, PNG, GIF, BMP or WebP image '
      '({} bytes, starting {})',
      (index, tf.strings.length(data), tf.io.decode_raw(head, tf.uint8)),
      summarize=_HEAD_BYTES), hint])
  return tf.debugging.Assert(_is_known_image(head), [message])


def decode_rgb(data):
  """Encoded image -> float32 [H, W, 3] RGB in [0, 255] (as the data sources)."""
  image = tf.io.decode_image(data, channels=0, dtype=tf.uint8,
                             expand_animations=False)
  channels = tf.shape(image)[-1]
  image = tf.cast(image, tf.float32)
  color = tf.cond(channels < 3,
                  lambda: tf.tile(image[..., :1], [1, 1, 3]),
                  lambda: image[..., :3])
  has_alpha = tf.equal(channels % 2, 0)  # gray+alpha or RGBA.

  def composite():
    alpha = image[..., -1:] / 255.0
    return tf.round(color * alpha + 255.0 * (1.0 - alpha))

  return tf.cond(has_alpha, composite, lambda: color)


def resize_to(image, size: Tuple[int, int]):
  """[H, W, 3] -> [size, 3]: bilinear with anti-aliasing, unless already that size."""
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], size[0]), tf.equal(shape[1], size[1]))
  resized = tf.cond(
      same, lambda: image,
      lambda: tf.image.resize(image, size, method='bilinear', antialias=True))
  return tf.ensure_shape(resized, [size[0], size[1], 3])


def decode_batch(images, image_size: Tuple[int, int],
                 input_name: str = IMAGES_INPUT):
  """string [B] of encoded images -> float32 [B, h, w, 3] in [0, 255]."""
  images = tf.convert_to_tensor(images, tf.string)
  count = tf.size(images)
  non_empty = tf.debugging.Assert(
      count > 0, [f'{input_name} is an empty batch: send at least one '
                  f'encoded image.'])
  with tf.control_dependencies([non_empty]):
    indices = tf.range(count)

  def decode_one(args):
    index, data = args
    with tf.control_dependencies([check_encoded_image(data, index,
                                                      input_name)]):
      image = decode_rgb(data)
    return resize_to(image, image_size)

  return tf.map_fn(
      decode_one, (indices, images),
      fn_output_signature=tf.TensorSpec([image_size[0], image_size[1], 3],
                                        tf.float32))


def check_pixels(pixels, input_name: str = PIXELS_INPUT):
  """Asserts a non-empty finite RGB batch in [0, 255]; returns the pixels."""
  pixels = tf.convert_to_tensor(pixels, tf.float32)
  shape = tf.shape(pixels)
  checks = [
      tf.debugging.Assert(
          shape[0] > 0, [f'{input_name} is an empty batch: send at least one '
                         f'image.']),
      tf.debugging.Assert(
          tf.logical_and(shape[1] > 0, shape[2] > 0),
          [tf.strings.format(input_name + ' images have no pixels: height '
                             '{}, width {}.', (shape[1], shape[2]))]),
  ]
  with tf.control_dependencies(checks):
    finite = tf.reduce_all(tf.math.is_finite(pixels))
    in_range = tf.logical_and(tf.reduce_all(pixels >= 0.0),
                              tf.reduce_all(pixels <= 255.0))
  checks = [
      tf.debugging.Assert(finite, [f'{input_name} holds NaN or infinite '
                                   f'values.']),
      tf.debugging.Assert(
          tf.logical_or(tf.logical_not(finite), in_range),
          [tf.strings.format(input_name + ' must be RGB in [0, 255]; got min '
                             '{}, max {}.', (tf.reduce_min(pixels),
                                             tf.reduce_max(pixels)))]),
  ]
  with tf.control_dependencies(checks):
    return tf.identity(pixels)


class FeatureExtractor(tf.Module):
  """A trunk with decoding, preprocessing and pooling (see module docstring).

  Args:
    trunk: a built `ResNetV2` (its output stride is the one served).
    image_size: (height, width) encoded images are resized to.
    pooled_grid: the adaptive max-pool grid of the `pooled` output.
  """

  # tf.Module computes these as properties; the Reusable SavedModel API wants
  # them as saved attributes, so instances set them explicitly.
  variables = ()
  trainable_variables = ()

  def __init__(self, trunk, image_size: Sequence[int] = DEFAULT_IMAGE_SIZE,
               pooled_grid: Sequence[int] = POOLED_GRID, name=None):
    super().__init__(name=name)
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
      raise ValueError(f'image_size must be (height, width) with positive '
                       f'sizes, got {image_size}.')
    if not trunk.built:
      trunk.build_for_input()
    self.backbone = trunk
    self.image_size = image_size
    self.pooled_grid = tuple(int(g) for g in pooled_grid)
    self.output_stride = trunk.effective_output_stride
    self.depth = trunk.output_depth
    self.variables = list(trunk.variables)
    self.trainable_variables = list(trunk.trainable_variables)
    self.regularization_losses = [
        tf.function(self._regularization_loss, input_signature=[],
                    autograph=False)]

  def _regularization_loss(self):
    losses = self.backbone.losses
    if not losses:
      return tf.constant(0.0)
    return tf.add_n(losses)

  def features(self, pixels, training=False) -> Dict[str, tf.Tensor]:
    """float [B, H, W, 3] RGB in [0, 255] -> {'block3', 'pooled'} (no checks)."""
    end_points = self.backbone(vgg_preprocess(pixels), training=training)
    block3 = end_points[self.backbone.output_name]
    return {
        BLOCK3_OUTPUT: block3,
        POOLED_OUTPUT: pooling.adaptive_max_pool2d(block3, self.pooled_grid),
    }

  @tf.function(autograph=False)
  def __call__(self, pixels, training=False):
    return self.features(check_pixels(pixels), training=training)

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, name=IMAGES_INPUT)], autograph=False)
  def serve_images(self, images):
    return self.features(decode_batch(images, self.image_size))

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.float32, name=PIXELS_INPUT)],
               autograph=False)
  def serve_pixels(self, pixels):
    return self.features(check_pixels(pixels))

  def trace_call(self):
    """Traces `__call__` for inference and training, as SavedModel needs."""
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    for training in (False, True):
      self.__call__.get_concrete_function(spec, training=training)

  def signatures(self):
    return {
        SERVING_SIGNATURE: self.serve_images.get_concrete_function(),
        PIXELS_SIGNATURE: self.serve_pixels.get_concrete_function(),
    }

  def describe(self) -> dict:
    """What the export serves: sizes and output shapes (None = dynamic)."""
    h, w = self.image_size
    s = self.output_stride
    return {
        'trunk': self.backbone.scope,
        'output_stride': s,
        'depth': self.depth,
        'image_size': [h, w],
        'pooled_grid': list(self.pooled_grid),
        'signatures': {
            SERVING_SIGNATURE: {
                'inputs': {IMAGES_INPUT: {'dtype': 'string', 'shape': [None]}},
                'outputs': {
                    BLOCK3_OUTPUT: {'dtype': 'float32', 'shape': [
                        None, -(-h // s), -(-w // s), self.depth]},
                    POOLED_OUTPUT: {'dtype': 'float32', 'shape': [
                        None, *self.pooled_grid, self.depth]},
                },
            },
            PIXELS_SIGNATURE: {
                'inputs': {PIXELS_INPUT: {'dtype': 'float32',
                                          'shape': [None, None, None, 3]}},
                'outputs': {
                    BLOCK3_OUTPUT: {'dtype': 'float32',
                                    'shape': [None, None, None, self.depth]},
                    POOLED_OUTPUT: {'dtype': 'float32', 'shape': [
                        None, *self.pooled_grid, self.depth]},
                },
            },
        },
    }
