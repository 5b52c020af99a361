"""Exemplar (Dosovitskiy et al. 2014) in the paper's triplet form (section 2).

Two augmentations of one 96x96 patch are a positive pair, a patch of another
example of the batch the negative; loss max(D(x1, x2) - D(x1, x3) + 0.5, 0)
with D = 1 - cos. Holds `ExConfig`, the augmentations, `PatchEmbeddingHead`
and the task. Choices: BUILD.md, "Exemplar".
"""

import dataclasses
import math
from typing import Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.configs import base as config_base
from mtssl.backbones import slim_layers
from mtssl.data import problems
from mtssl.ops import color
from mtssl.ops import preprocessing
from mtssl.ops import warp
from mtssl.ops import windows
from mtssl.tasks import base
from mtssl.tasks import heads
from mtssl.tasks import patches

class PatchEmbeddingHead(tf_keras.Model):
  """Exemplar's head: per patch, two strided units, flattened (paper: 4608).

  Called on the trunk features of `group` patches per example stacked
  example-major ([group * B, h, w, C]); returns [B, group, D].
  """

  def __init__(self, group: int, unit_depths=heads.PAPER_UNIT_DEPTHS,
               unit_bottleneck=heads.PAPER_UNIT_BOTTLENECK,
               weight_decay=slim_layers.WEIGHT_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.group = group
    self.unit_depths = tuple(unit_depths)
    self.units = heads.patch_units(self.unit_depths, unit_bottleneck, weight_decay)
    self.embedding_size = None

  def build(self, input_shape):
    self.embedding_size = heads.static_patch_width(input_shape, self.unit_depths)
    # Sub-layers build on the first call; Model.build would trace call() on
    # placeholders instead.
    tf_keras.layers.Layer.build(self, input_shape)

  def call(self, features, training=None):
    x = features
    for unit in self.units:
      x = unit(x, training=training)
    return tf.reshape(x, [-1, self.group, self.embedding_size])


MARGIN = 0.5
# Principal components of ImageNet pixel colours (RGB in [0, 1]), one per
# column, from Krizhevsky et al. 2012 as published with fb.resnet.torch.
IMAGENET_PCA_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009),
                             (-0.5808, -0.0045, -0.8140),
                             (-0.5836, -0.6948, 0.4203))
_PCA_INVERSE = np.linalg.inv(np.array(IMAGENET_PCA_EIGENVECTORS))
_SALT = 0x4558  # 'EX': this task's random stream.
_VIEWS = 3  # x1, x2, negative candidate.
# Draw numbers of an example's random choices.
_SEED_CENTRE, _CANDIDATE_CENTRE = 0, 1
_VIEW_SEEDS = 10  # View v's seed is draw _VIEW_SEEDS + v.
_COLOR_SEED = 100  # A view's colour draws come from its draw _COLOR_SEED.
(_TRANSLATION, _SCALE, _ROTATION, _PCA, _S_POWER, _S_SCALE, _S_SHIFT,
 _V_POWER, _V_SCALE, _V_SHIFT, _HUE) = range(11)


@dataclasses.dataclass
class ExConfig(base.TaskConfig):
  """Exemplar settings; defaults are the paper's / Dosovitskiy et al.'s."""
  image_size: int = config_base.field(
      256, 'images are resized to this square size (paper: 256)')
  patch_size: int = config_base.field(96, 'side of each view in pixels')
  max_translation: float = config_base.field(
      0.2, 'largest shift of a view\'s centre, as a fraction of the patch '
      'size per axis')
  scale_range: Tuple[float, float] = config_base.field(
      (0.7, 1.4), 'scaling factor range of a view (log-uniform)')
  max_rotation_degrees: float = config_base.field(
      20.0, 'largest rotation of a view in degrees')
  pca_factor_range: Tuple[float, float] = config_base.field(
      (0.5, 2.0), 'factor range on each principal colour component '
      '("contrast 1", log-uniform)')
  sv_power_range: Tuple[float, float] = config_base.field(
      (0.25, 4.0), 'power range of saturation and value ("contrast 2", '
      'log-uniform)')
  sv_factor_range: Tuple[float, float] = config_base.field(
      (0.7, 1.4), 'factor range of saturation and value (log-uniform)')
  max_sv_shift: float = config_base.field(
      0.1, 'largest shift of saturation and value')
  max_hue_shift: float = config_base.field(
      0.1, 'largest hue shift, as a fraction of the hue circle')
  margin: float = config_base.field(MARGIN, 'triplet loss margin M')
  unit_depths: Tuple[int, ...] = config_base.field(
      heads.PAPER_UNIT_DEPTHS, 'output depths of the head\'s ResNet units')
  unit_bottleneck: int = config_base.field(
      heads.PAPER_UNIT_BOTTLENECK, 'bottleneck depth of the head\'s units')
  weight_decay: float = config_base.field(1e-4, 'L2 weight decay of the head')
  fast_preprocessing: bool = config_base.field(
      True, 'one batched colour shift of the three views with fast kernels '
      '(same values; module docstring)')
  device_preprocessing: bool = config_base.field(
      False, 'the resize, the views\' warps and colour shifts inside the '
      'compiled training step: the input pipeline yields the decoded image '
      '(uint8, padded to device_image_bound), the views\' transforms and '
      'their colour draws')
  device_image_bound: int = config_base.field(
      512, 'side of the padded image sent per example with '
      'device_preprocessing (at least 2 x image_size); larger images are '
      'resized on the host')

  def validate(self):
    super().validate()
    if self.batch_size < 2:
      raise ValueError(f'ex batch_size must be at least 2 (the negative of a '
                       f'triplet comes from another example of the batch), '
                       f'got {self.batch_size}.')
    if not 0 < self.patch_size <= self.image_size:
      raise ValueError(f'ex needs 0 < patch_size <= image_size, got '
                       f'{self.patch_size}, {self.image_size}.')
    for name in ('scale_range', 'pca_factor_range', 'sv_power_range',
                 'sv_factor_range'):
      low, high = getattr(self, name)
      if not 0 < low <= high:
        raise ValueError(f'ex {name} must be 0 < low <= high, got '
                         f'{(low, high)}.')
    for name in ('max_translation', 'max_rotation_degrees', 'max_sv_shift',
                 'max_hue_shift', 'margin'):
      if getattr(self, name) < 0:
        raise ValueError(f'ex {name} must be >= 0, got {getattr(self, name)}.')
    if not self.unit_depths or min(self.unit_depths) <= 0:
      raise ValueError(f'ex unit_depths must be positive, got '
                       f'{self.unit_depths}.')
    if (self.device_preprocessing
        and self.device_image_bound < 2 * self.image_size):
      raise ValueError(
          f'ex device_image_bound {self.device_image_bound} is below 2 x '
          f'image_size ({2 * self.image_size}): an image resized on the host '
          f'(float32) would not fit in its bytes.')


def view_transform(centre, translation, scale, angle, patch_size):
  """ImageProjectiveTransformV3 parameters of one view, float32 [8].

  The view's pixel (x, y) samples the image at
  centre + translation + scale * R(angle) @ ((x, y) - (p - 1) / 2),
  with (x, y) pixel-centre coordinates; `centre` and `translation` are (y, x).
  """
  scale = tf.cast(scale, tf.float32)
  angle = tf.cast(angle, tf.float32)
  half = (patch_size - 1) / 2.0
  cos, sin = scale * tf.cos(angle), scale * tf.sin(angle)
  target = tf.cast(centre, tf.float32) + tf.cast(translation, tf.float32)
  ty, tx = target[0], target[1]
  return tf.stack([cos, -sin, tx - cos * half + sin * half,
                   sin, cos, ty - sin * half - cos * half,
                   0.0, 0.0])


def extract_views(image, transforms, patch_size):
  """Views [N, p, p, C] of one float image [H, W, C] under N transforms.

  With a static N every view is sampled from the one image by its own call
  (bit-identical to the batched call, without N copies of the image).
  """

  def warp(images, view_transforms):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=view_transforms,
        output_shape=tf.constant([patch_size, patch_size], tf.int32),
        fill_value=tf.constant(0.0), interpolation='BILINEAR',
        fill_mode='REFLECT')

  transforms = tf.convert_to_tensor(transforms, tf.float32)
  if transforms.shape[0] is not None:
    return tf.concat([warp(image[tf.newaxis], transforms[i:i + 1])
                      for i in range(transforms.shape[0])], axis=0)
  n = tf.shape(transforms)[0]
  return warp(tf.tile(image[tf.newaxis], tf.stack([n, 1, 1, 1])), transforms)


def resize_image(image, size: int):
  """The image ([H, W, 3] uint8) as float32 RGB in [0, 1], resized to size x
  size (bilinear, antialiased)."""
  image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, [size, size],
                          method='bilinear', antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0)


def padded_source(image, size: int, bound: int):
  """With device_preprocessing: source uint8 [bound, bound, 3], the image
  zero-padded, and its source_size [2]; an image larger than bound on a side
  is resized here (`resize_image`) and sent as the bytes of its float32
  values (resized_on_host; `resize_sources` reads them back)."""
  shape = tf.shape(image)[:2]
  fits = tf.reduce_all(shape <= bound)

  def _padded():
    return tf.pad(image, [[0, bound - shape[0]], [0, bound - shape[1]],
                          [0, 0]])

  def _resized():
    data = tf.reshape(tf.bitcast(resize_image(image, size), tf.uint8), [-1])
    return tf.reshape(tf.pad(data, [[0, 3 * bound * bound - 12 * size * size]]),
                      [bound, bound, 3])

  source = tf.cond(fits, _padded, _resized)
  source.set_shape([bound, bound, 3])
  return {'source': source,
          'source_size': tf.where(fits, shape, bound),
          'resized_on_host': tf.logical_not(fits)}


def resize_sources(source, source_size, resized_on_host, size: int):
  """`padded_source`'s outputs of a batch -> float32 [B, size, size, 3] in
  [0, 1]: `resize_image` of each image, as matrix products of the resize's
  weights (mtssl.ops.windows), or the values sent for an image resized on
  the host."""
  count = tf.shape(source)[0]
  image_size = tf.cast(source_size, tf.int32)
  on_device = windows.resample(
      tf.cast(source, tf.float32) / 255.0, tf.zeros([count, 2], tf.int32),
      image_size,
      float(size) / tf.cast(image_size, tf.float32),
      tf.zeros([count, 2], tf.float32), size=size)
  data = tf.reshape(source, [count, -1])[:, :12 * size * size]
  on_host = tf.bitcast(tf.reshape(data, [count, size, size, 3, 4]),
                       tf.float32)
  return tf.where(resized_on_host[:, tf.newaxis, tf.newaxis, tf.newaxis],
                  on_host, tf.clip_by_value(on_device, 0.0, 1.0))


def warp_views(images, transforms, patch_size):
  """`extract_views` (clipped to [0, 1]) of a batch, in ops a compiled step
  runs: images [B, H, W, C], transforms [B, V, 8] -> views [B, V, p, p, C]."""
  batch, count = tf.shape(transforms)[0], transforms.shape[1]
  views = warp.projective_bilinear(
      images, tf.reshape(transforms, [-1, 8]), [patch_size, patch_size],
      image_index=tf.repeat(tf.range(batch), count))
  views = tf.reshape(views, tf.concat(
      [[batch, count], tf.shape(views)[1:]], 0))
  return tf.clip_by_value(views, 0.0, 1.0)


def color_parameters(seed, config: ExConfig):
  """The random draws of one view's colour shift (see `color_shift`)."""
  draw = lambda d: patches.draw_seed(seed, d)

  def uniform(d, limit):
    return tf.random.stateless_uniform([], draw(d), -limit, limit)

  return {
      'pca_factors': patches.log_uniform(draw(_PCA), *config.pca_factor_range,
                                         shape=[3]),
      's_power': patches.log_uniform(draw(_S_POWER), *config.sv_power_range),
      's_factor': patches.log_uniform(draw(_S_SCALE), *config.sv_factor_range),
      's_shift': uniform(_S_SHIFT, config.max_sv_shift),
      'v_power': patches.log_uniform(draw(_V_POWER), *config.sv_power_range),
      'v_factor': patches.log_uniform(draw(_V_SCALE), *config.sv_factor_range),
      'v_shift': uniform(_V_SHIFT, config.max_sv_shift),
      'hue_shift': uniform(_HUE, config.max_hue_shift),
  }


def apply_color_shift(patch, params, fast: bool = False):
  """Colour shift of RGB patches in [0, 1], [..., h, w, 3], with `params`
  from `color_parameters` (stacked along the leading axes for a batch).

  `fast` uses mtssl.ops.color's fast kernels (MatMul for the 3x3 maps,
  exp/log powers): the same values within float32 rounding.
  """
  expand = lambda x: tf.convert_to_tensor(x)[..., tf.newaxis, tf.newaxis]
  mean = tf.reduce_mean(patch, axis=[-3, -2], keepdims=True)
  # Coordinates in the eigenbasis, scaled, mapped back. (The published
  # vectors are rounded, so the inverse rather than the transpose makes
  # factors of 1 an exact identity.)
  coordinates = color.mix_channels(patch - mean, _PCA_INVERSE, fast) * (
      tf.convert_to_tensor(params['pca_factors'])[..., tf.newaxis,
                                                  tf.newaxis, :])
  patch = tf.clip_by_value(
      mean + color.mix_channels(coordinates, IMAGENET_PCA_EIGENVECTORS, fast),
      0.0, 1.0)
  hue, sat, val = tf.unstack(tf.image.rgb_to_hsv(patch), axis=-1)

  def contrast(x, name):
    x = color.power(x, expand(params[f'{name}_power']), fast)
    return tf.clip_by_value(x * expand(params[f'{name}_factor']) +
                            expand(params[f'{name}_shift']), 0.0, 1.0)

  sat, val = contrast(sat, 's'), contrast(val, 'v')
  hue = tf.math.floormod(hue + expand(params['hue_shift']), 1.0)
  return tf.image.hsv_to_rgb(tf.stack([hue, sat, val], axis=-1))


def color_shift(patch, seed, config: ExConfig, fast: bool = False):
  """Dosovitskiy et al.'s colour augmentations of an RGB patch in [0, 1]."""
  return apply_color_shift(patch, color_parameters(seed, config), fast)


def view_color_parameters(seeds, config: ExConfig):
  """`color_parameters` of every view, view v with seeds[v], stacked [V, ...]."""
  params = [color_parameters(s, config) for s in seeds]
  return {k: tf.stack([p[k] for p in params]) for k in params[0]}


def color_shift_views(views, seeds, config: ExConfig, fast: bool = True):
  """`color_shift` of every view [V, h, w, 3], view v with seeds[v], as one
  batched computation."""
  return apply_color_shift(views, view_color_parameters(seeds, config), fast)


def sample_view(seed, centre, config: ExConfig):
  """Random (translation, scale, angle) of one view and its transform."""
  draw = lambda d: patches.draw_seed(seed, d)
  reach = config.max_translation * config.patch_size
  translation = tf.random.stateless_uniform([2], draw(_TRANSLATION), -reach,
                                            reach)
  scale = patches.log_uniform(draw(_SCALE), *config.scale_range)
  limit = math.radians(config.max_rotation_degrees)
  angle = tf.random.stateless_uniform([], draw(_ROTATION), -limit, limit)
  return view_transform(centre, translation, scale, angle, config.patch_size)


def _sample_centre(seed, config: ExConfig):
  half = (config.patch_size - 1) / 2.0
  return tf.random.stateless_uniform([2], seed, half,
                                     config.image_size - 1 - half)


@base.register
class ExemplarTask(base.Task):
  """Exemplar with a triplet loss on cosine distances."""

  name = 'ex'
  config_class = ExConfig
  paper_epoch_gpu_hours = 60.0
  cpu_overrides = {'unit_depths': (128, 64), 'unit_bottleneck': 32}
  paper_trunk_inputs = (3, (96, 96))
  gpu_overrides = {'batch_size': 64, 'device_preprocessing': True}
  head_fields = ('patch_size', 'unit_depths', 'unit_bottleneck')

  def paper_head_gmacs(self, trunk_images):
    return heads.PAPER_PATCH_HEAD_GMACS * trunk_images

  def example(self, index, image, seed):
    """Three views of one image; pure in (seed, index).

    features: index, patches [3, p, p, 3] (x1, x2, negative candidate; trunk
    inputs, VGG convention), centres [2, 2] ((y, x) of the seed patch and of
    the candidate's patch in the 256x256 image), transforms [3, 8]. With
    device_preprocessing, the image's `padded_source` (source, source_size,
    resized_on_host) and color (the views' `view_color_parameters`) in place
    of patches.
    """
    cfg = self.config
    seed = patches.example_seed(seed, index, _SALT)
    centres = tf.stack([
        _sample_centre(patches.draw_seed(seed, _SEED_CENTRE), cfg),
        _sample_centre(patches.draw_seed(seed, _CANDIDATE_CENTRE), cfg)])
    view_seeds = [patches.draw_seed(seed, _VIEW_SEEDS + v) for v in range(_VIEWS)]
    view_centres = [centres[0], centres[0], centres[1]]
    transforms = tf.stack([sample_view(s, c, cfg)
                           for s, c in zip(view_seeds, view_centres)])
    color_seeds = [patches.draw_seed(s, _COLOR_SEED) for s in view_seeds]
    features = {'index': tf.cast(index, tf.int64), 'centres': centres,
                'transforms': transforms}
    if cfg.device_preprocessing:
      return dict(features, color=view_color_parameters(color_seeds, cfg),
                  **padded_source(image, cfg.image_size,
                                  cfg.device_image_bound))
    image = resize_image(image, cfg.image_size)
    views = tf.clip_by_value(extract_views(image, transforms, cfg.patch_size),
                             0.0, 1.0)
    if cfg.fast_preprocessing:
      views = color_shift_views(views, color_seeds, cfg)
    else:
      views = tf.stack([color_shift(views[v], color_seeds[v], cfg)
                        for v in range(_VIEWS)])
    features['patches'] = preprocessing.vgg_preprocess(views * 255.0)
    return features

  @staticmethod
  def arrange_triplets(features):
    """Batch-level: the third patch of example i becomes example i+1's
    candidate (mod B), so every triplet's negative is from another image."""
    out = dict(features)
    x = features['patches']
    out['patches'] = tf.concat(
        [x[:, :2], tf.roll(x[:, 2:], shift=-1, axis=0)], axis=1)
    return out, {'negative_index': tf.roll(features['index'], shift=-1,
                                           axis=0)}

  def make_dataset(self, source, batch_size, seed, start=0):
    if batch_size < 2:
      raise ValueError(f'ex batch_size must be at least 2 (the negative of a '
                       f'triplet comes from another example of the batch), '
                       f'got {batch_size}.')

    def _example(index, image):
      return self.example(index, image, seed)

    ds = problems.map_examples(source, seed, start, _example,
                               num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if self.config.device_preprocessing:
      return ds.map(lambda features: (features, {})).prefetch(tf.data.AUTOTUNE)
    return ds.map(tf.autograph.experimental.do_not_convert(
        self.arrange_triplets)).prefetch(tf.data.AUTOTUNE)

  def device_inputs(self, features, labels):
    """With device_preprocessing: the views' warps and colour shifts, then
    the triplets (what the host path does per example and per batch); the
    host yields no labels then."""
    if not self.config.device_preprocessing:
      return features, labels
    features = dict(features)
    images = resize_sources(features.pop('source'), features.pop('source_size'),
                            features.pop('resized_on_host'),
                            self.config.image_size)
    views = warp_views(images, features['transforms'], self.config.patch_size)
    views = apply_color_shift(views, features.pop('color'),
                              self.config.fast_preprocessing)
    features['patches'] = preprocessing.vgg_preprocess(views * 255.0)
    return self.arrange_triplets(features)

  def trunk_images(self, features):
    return patches.flatten_groups(features['patches'])

  def build_head(self):
    cfg = self.config
    return PatchEmbeddingHead(
        _VIEWS, unit_depths=cfg.unit_depths,
        unit_bottleneck=cfg.unit_bottleneck, weight_decay=cfg.weight_decay,
        name='ex_head')

  def loss(self, labels, outputs):
    del labels
    return tf.reduce_mean(triplet_loss(outputs, self.config.margin))

  def build_metrics(self):
    return {'triplet_accuracy': tf_keras.metrics.Mean('triplet_accuracy'),
            'loss': tf_keras.metrics.Mean('loss')}

  def update_metrics(self, metrics, labels, outputs):
    del labels
    positive, negative = triplet_distances(outputs)
    metrics['triplet_accuracy'].update_state(
        tf.cast(positive < negative, tf.float32))
    metrics['loss'].update_state(triplet_loss(outputs, self.config.margin))

  def image_summaries(self, features, labels, outputs):
    del labels, outputs
    views = patches.for_display(features['patches'])
    # Anchor, positive and negative side by side.
    return {'ex/triplets': tf.concat(tf.unstack(views, axis=1), axis=2)}


def triplet_distances(embeddings):
  """Cosine distances (D(f1, f2), D(f1, f3)) of [B, 3, D] embeddings."""
  f = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)
  anchor, positive, negative = f[:, 0], f[:, 1], f[:, 2]
  return (1.0 - tf.reduce_sum(anchor * positive, axis=-1),
          1.0 - tf.reduce_sum(anchor * negative, axis=-1))


def triplet_loss(embeddings, margin: float = MARGIN):
  """Per-triplet max(D(f1, f2) - D(f1, f3) + margin, 0), shape [B]."""
  positive, negative = triplet_distances(embeddings)
  return tf.nn.relu(positive - negative + margin)
