"""Relative position (Doersch, Gupta & Efros 2015; paper section 2).

Two patches from adjacent grid points of one image; predict where the second
lies relative to the first (8 classes, `LABEL_OFFSETS`). Holds `RPConfig`,
the pair sampling and colour dropping of the 2015 code, `RelativePositionHead`
and the task. Choices: BUILD.md, "Relative position".

Typical use:

    task = tasks.make_task('rp', batch_size=8)   # harmonize=True: "RP/H"
    dataset = task.make_dataset(task.make_source('synthetic'), 8, seed=0)
    features, labels = next(iter(dataset))
"""

import dataclasses
from typing import Optional, Tuple

import tensorflow as tf
import tf_keras

from mtssl.configs import base as config_base
from mtssl.backbones import slim_layers
from mtssl.data import problems
from mtssl.ops import color
from mtssl.ops import philox
from mtssl.ops import windows
from mtssl.ops import preprocessing
from mtssl.tasks import base
from mtssl.tasks import heads
from mtssl.tasks import patches

# (dy, dx) of the second patch relative to the first, indexed by label.
PAPER_FC_BOTTLENECK = 512
PAPER_NUM_FC_UNITS = 3


class FullyConnectedBottleneck(slim_layers.BottleneckV2):
  """A Slim bottleneck unit on 1x1 maps with a 1x1 middle convolution."""

  def __init__(self, depth, depth_bottleneck,
               weight_decay=slim_layers.WEIGHT_DECAY, **kwargs):
    super().__init__(depth, depth_bottleneck, stride=1, rate=1,
                     weight_decay=weight_decay, **kwargs)
    # Replaces the 3x3 middle convolution before anything is built.
    self.conv2 = slim_layers.SlimConv2D(
        depth_bottleneck, 1, 1, weight_decay=weight_decay, name='conv2')

  def get_config(self):
    config = super().get_config()
    del config['stride'], config['rate']
    return config


class RelativePositionHead(tf_keras.Model):
  """Relative position's head (design choices: BUILD.md, "Head widths"); 8-way logits.

  Called on the trunk features of both patches of every pair stacked
  pair-major ([2B, h, w, C]: pair 0 first patch, pair 0 second patch, pair 1
  first patch, ...); returns logits [B, num_classes].
  """

  def __init__(self, num_classes: int = 8, unit_depths=heads.PAPER_UNIT_DEPTHS,
               unit_bottleneck=heads.PAPER_UNIT_BOTTLENECK,
               fc_depth: Optional[int] = None,
               fc_bottleneck=PAPER_FC_BOTTLENECK,
               num_fc_units=PAPER_NUM_FC_UNITS,
               weight_decay=slim_layers.WEIGHT_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.num_classes = num_classes
    self.unit_depths = tuple(unit_depths)
    self.fc_depth = fc_depth
    self.fc_bottleneck = fc_bottleneck
    self.num_fc_units = num_fc_units
    self.weight_decay = weight_decay
    self.units = heads.patch_units(self.unit_depths, unit_bottleneck, weight_decay)
    self.fc_units = []  # Sized in build() from the patch features' width.
    self.patch_width = None
    self.postnorm = tf_keras.layers.BatchNormalization(
        momentum=slim_layers.BATCH_NORM_DECAY,
        epsilon=slim_layers.BATCH_NORM_EPSILON,
        name='postnorm')
    self.logits = slim_layers.SlimConv2D(
        num_classes, 1, batch_norm=False, activation=False,
        weight_decay=weight_decay, name='logits')

  def build(self, input_shape):
    self.patch_width = heads.static_patch_width(input_shape, self.unit_depths)
    depth = self.fc_depth or self.patch_width
    # Extend the tracked list rather than replacing it: a checkpoint restore
    # requested before the head was built is attached to this list object.
    self.fc_units.extend(
        FullyConnectedBottleneck(depth, self.fc_bottleneck,
                                 weight_decay=self.weight_decay,
                                 name=f'fc_unit_{i + 1}/bottleneck_v2')
        for i in range(self.num_fc_units))
    tf_keras.layers.Layer.build(self, input_shape)

  def patch_features(self, features, training=None):
    """The flattened per-patch features, [N, patch_width]."""
    x = features
    for unit in self.units:
      x = unit(x, training=training)
    return tf.reshape(x, [-1, self.patch_width])

  def call(self, features, training=None):
    # Row-major reshape of [2B, F] to [B, 2F] concatenates each pair's first
    # and second patch features, in that order.
    pairs = tf.reshape(self.patch_features(features, training=training),
                       [-1, 1, 1, 2 * self.patch_width])
    x = pairs
    for unit in self.fc_units:
      x = unit(x, training=training)
    x = tf.nn.relu(self.postnorm(x, training=training))
    return tf.reshape(self.logits(x), [-1, self.num_classes])


LABEL_OFFSETS = ((-1, -1), (-1, 0), (-1, 1),
                 (0, -1), (0, 1),
                 (1, -1), (1, 0), (1, 1))
NUM_CLASSES = len(LABEL_OFFSETS)
COLOR_DROP_RMS = 50.0  # 2015: patches scaled to this root-mean-square.
COLOR_DROP_NOISE = 0.5  # 2015: dropped channels ~ uniform(0, 1) - 0.5.
UPSCALE_REASON = 'rp_upscaled_small_image'
_SALT = 0x5250  # 'RP': this task's random stream.
# Draw numbers of an example's random choices.
(_PIXELS, _ORIGIN_Y, _ORIGIN_X, _LABEL, _FIRST_Y, _FIRST_X, _JITTER,
 _COLOR_1, _COLOR_2) = range(9)
_PATCH_SEEDS = 100  # Patch i's colour seed is draw _PATCH_SEEDS + i.


@dataclasses.dataclass
class RPConfig(base.TaskConfig):
  """Relative position settings; defaults are the paper's / 2015 values."""
  patch_size: int = config_base.field(96, 'side of each patch in pixels')
  gap: int = config_base.field(48, 'pixels between adjacent grid patches')
  jitter: int = config_base.field(
      7, 'largest random shift of each patch, pixels per axis')
  min_pixels: int = config_base.field(
      150_000, 'images are resized to between min_pixels and max_pixels')
  max_pixels: int = config_base.field(
      450_000, 'upper end of the resize range (see min_pixels)')
  harmonize: bool = config_base.field(
      False, 'Lab lightness replicated x3 instead of colour dropping (the '
      'paper\'s /H, section 3.3)')
  unit_depths: Tuple[int, ...] = config_base.field(
      heads.PAPER_UNIT_DEPTHS, 'output depths of the head\'s per-patch ResNet '
      'units (paper section 3.4)')
  unit_bottleneck: int = config_base.field(
      heads.PAPER_UNIT_BOTTLENECK, 'bottleneck depth of the per-patch units')
  fc_depth: Optional[int] = config_base.field(
      None, 'width of the pair units (default: one patch\'s flattened '
      'width, 4608)')
  fc_bottleneck: int = config_base.field(
      PAPER_FC_BOTTLENECK, 'bottleneck depth of the pair units')
  num_fc_units: int = config_base.field(
      PAPER_NUM_FC_UNITS, 'pair units before the 8-way classifier')
  weight_decay: float = config_base.field(1e-4, 'L2 weight decay of the head')
  fast_preprocessing: bool = config_base.field(
      True, 'resize only the patch windows (same values; module docstring)')
  device_preprocessing: bool = config_base.field(
      False, 'colour dropping (its noise and normalization) or the '
      'harmonized lightness inside the compiled training step: the input '
      'pipeline yields the source pixels of the two patch windows (with '
      'colour dropping, of the kept channel), the noise\'s Philox key and '
      'counter')
  device_region: int = config_base.field(
      0, 'side of the source region sent per patch with device_preprocessing '
      '(0: 5/3 of patch_size, rounded up to a multiple of 8); a window that '
      'reads more (a large downscale) is resampled on the host')

  def validate(self):
    super().validate()
    if self.patch_size <= 0:
      raise ValueError(f'rp patch_size must be positive, got {self.patch_size}.')
    if self.gap < 0 or self.jitter < 0:
      raise ValueError(f'rp gap and jitter must be >= 0, got gap={self.gap}, '
                       f'jitter={self.jitter}.')
    if 2 * self.jitter > self.gap:
      raise ValueError(f'rp jitter {self.jitter} is more than half the gap '
                       f'{self.gap}: the patches of a pair could overlap.')
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f'rp needs 0 < min_pixels <= max_pixels, got '
                       f'{self.min_pixels}, {self.max_pixels}.')
    if not self.unit_depths or min(self.unit_depths) <= 0:
      raise ValueError(f'rp unit_depths must be positive, got '
                       f'{self.unit_depths}.')
    for name in ('unit_bottleneck', 'fc_bottleneck', 'num_fc_units'):
      if getattr(self, name) <= 0:
        raise ValueError(f'rp {name} must be positive, got '
                         f'{getattr(self, name)}.')
    if self.fc_depth is not None and self.fc_depth <= 0:
      raise ValueError(f'rp fc_depth must be positive, got {self.fc_depth}.')
    if self.device_region and self.device_region < self.patch_size + 8:
      raise ValueError(
          f'rp device_region {self.device_region} is below patch_size + 8 '
          f'({self.patch_size + 8}): every window would be resampled on the '
          f'host. Use 0 for the default.')

  @property
  def region_size(self) -> int:
    """Side of the source region per patch with device_preprocessing."""
    return self.device_region or -(-5 * self.patch_size // 24) * 8

  @property
  def min_side(self) -> int:
    """Shortest image side that holds two adjacent patches."""
    return 2 * self.patch_size + self.gap


def resized_shape(height, width, pixels, min_side):
  """Size with about `pixels` pixels and the aspect ratio of height x width,
  enlarged so that the shorter side is at least `min_side`.

  Returns (new_height, new_width, upscaled): int32 scalars and whether the
  enlargement was needed.
  """
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  scale = tf.sqrt(tf.cast(pixels, tf.float64) / (h * w))
  new_h = tf.maximum(tf.round(h * scale), 1.0)
  new_w = tf.maximum(tf.round(w * scale), 1.0)
  short = tf.minimum(new_h, new_w)
  upscaled = short < min_side
  # (n * min_side) / short is exact, so the shorter side becomes min_side.
  new_h = tf.where(upscaled, tf.math.ceil(new_h * min_side / short), new_h)
  new_w = tf.where(upscaled, tf.math.ceil(new_w * min_side / short), new_w)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32), upscaled


def sample_pair_geometry(height, width, seed, patch_size=96, gap=48, jitter=7):
  """Grid, label and patch corners of one pair in a height x width image.

  The image must be at least 2 * patch_size + gap on each side.

  Returns a dict of int32 tensors:
    label: [] in 0..7 (see LABEL_OFFSETS).
    grid_origin: [2] (y, x) of the grid's first point.
    grid_size: [2] grid points per column and per row.
    grid_points: [2, 2] (y, x) top-left corners of the two patches before
      jitter, one row per patch.
    corners: [2, 2] (y, x) top-left corners after jitter and clipping.
  """
  step = patch_size + gap
  size = tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32)])
  origin = tf.stack([
      patches.uniform_int(patches.draw_seed(seed, d), 0,
                          tf.minimum(step - 1, size[i] - patch_size - step))
      for i, d in ((0, _ORIGIN_Y), (1, _ORIGIN_X))])
  grid_size = (size + gap - origin) // step
  label = patches.uniform_int(patches.draw_seed(seed, _LABEL), 0,
                              NUM_CLASSES - 1)
  offset = tf.gather(tf.constant(LABEL_OFFSETS, tf.int32), label)
  # First grid point: any point whose neighbour at `offset` is on the grid.
  low = tf.maximum(-offset, 0)
  high = grid_size - 1 - tf.maximum(offset, 0)
  first = tf.stack([
      patches.uniform_int(patches.draw_seed(seed, d), low[i], high[i])
      for i, d in ((0, _FIRST_Y), (1, _FIRST_X))])
  cells = tf.stack([first, first + offset])
  grid_points = origin + cells * step
  shifts = patches.uniform_int(patches.draw_seed(seed, _JITTER), -jitter,
                               jitter, shape=[2, 2])
  corners = tf.clip_by_value(grid_points + shifts, 0, size - patch_size)
  return {'label': label, 'grid_origin': origin, 'grid_size': grid_size,
          'grid_points': grid_points, 'corners': corners}


def kept_channel(seed) -> tf.Tensor:
  """The channel colour dropping keeps for a given patch seed."""
  return patches.uniform_int(patches.draw_seed(seed, _COLOR_1), 0, 2)


def patch_seed(seed, i):
  """The colour seed of patch i (0 or 1) of an example."""
  return patches.draw_seed(seed, _PATCH_SEEDS + i)


def color_drop(patch, seed):
  """2015 colour dropping of one RGB patch in [0, 255] (see module docstring).

  Returns float32 [h, w, 3] in the trunk's RGB convention: vgg_preprocess of
  it is the 2015 network input (kept channel mean-subtracted, the others
  uniform noise, RMS 50).
  """
  return normalize_color_drop(*color_drop_draws(patch, seed))


def color_drop_draws(patch, seed):
  """The random part of `color_drop`: (the patch with uniform noise in its
  dropped channels, float32 [h, w, 3]; the kept channel)."""
  patch = tf.cast(patch, tf.float32)
  keep = kept_channel(seed)
  noise = tf.random.stateless_uniform(
      tf.shape(patch), seed=patches.draw_seed(seed, _COLOR_2),
      minval=-COLOR_DROP_NOISE, maxval=COLOR_DROP_NOISE)
  return tf.where(tf.equal(tf.range(3), keep), patch, noise), keep


def noise_key_counter(seed):
  """The Philox key and counter of `color_drop_draws`' noise for a patch
  seed: `noise_in_dropped` draws the same noise from them on any device."""
  return philox.key_counter(patches.draw_seed(seed, _COLOR_2))


def noise_in_dropped(kept, keep, key, counter):
  """`color_drop_draws`' first output from the kept channel alone, any
  leading axes: kept [..., h, w, 1] float32, keep [...], key [..., 1] and
  counter [..., 2] from `noise_key_counter` (the same values bit for bit)."""
  size = kept.shape[-3:-1]
  noise = philox.uniform(list(size) + [3], key, counter,
                         -COLOR_DROP_NOISE, COLOR_DROP_NOISE)
  keep = tf.cast(keep, tf.int32)[..., None, None, None]
  return tf.where(tf.equal(tf.range(3), keep), kept, noise)


def normalize_color_drop(mixed, keep):
  """The rest of `color_drop` on `color_drop_draws`' outputs, any leading
  axes (mixed [..., h, w, 3], keep [...]): the kept channel mean-subtracted,
  RMS 50 over the patch."""
  kept = tf.equal(tf.range(3), tf.cast(keep, tf.int32)[..., None, None, None])
  centred = mixed - tf.reduce_mean(mixed, axis=[-3, -2], keepdims=True)
  dropped = tf.where(kept, centred, mixed)
  rms = tf.sqrt(tf.reduce_mean(tf.square(dropped), axis=[-3, -2, -1],
                               keepdims=True))
  dropped = dropped * (COLOR_DROP_RMS / tf.maximum(rms, 1e-6))
  return dropped + tf.constant(preprocessing.VGG_MEAN_RGB, tf.float32)


@base.register
class RelativePositionTask(base.Task):
  """Relative position of two patches: 8-way classification."""

  name = 'rp'
  config_class = RPConfig
  paper_epoch_gpu_hours = 350.0
  cpu_overrides = {'unit_depths': (128, 64), 'unit_bottleneck': 32,
                   'fc_bottleneck': 128}
  paper_trunk_inputs = (2, (96, 96))
  gpu_overrides = {'batch_size': 256, 'device_preprocessing': True}
  head_fields = ('patch_size', 'unit_depths', 'unit_bottleneck', 'fc_depth',
                 'fc_bottleneck', 'num_fc_units')

  def paper_head_gmacs(self, trunk_images):
    return heads.PAPER_PATCH_HEAD_GMACS * trunk_images

  def example(self, index, image, seed, counter=None):
    """One (features, labels) pair from one image; pure in (seed, index).

    features: index, patches [2, p, p, 3] (trunk inputs, VGG convention),
      corners [2, 2] (y, x of each patch in the resized image), image_size
      [2] (the resized image). labels: label []. With device_preprocessing
      `device_inputs` makes the patches from the windows' source pixels
      (window_*, `windows.cut`; with colour dropping of the kept channel
      alone) and, with colour dropping, kept_channels [2], noise_key [2, 1]
      and noise_counter [2, 2].
    """
    cfg = self.config
    seed = patches.example_seed(seed, index, _SALT)
    shape = tf.shape(image)
    pixels = patches.uniform_int(patches.draw_seed(seed, _PIXELS),
                                 cfg.min_pixels, cfg.max_pixels)
    height, width, upscaled = resized_shape(shape[0], shape[1], pixels,
                                            cfg.min_side)
    if counter is not None:
      upscaled = counter.note(upscaled, UPSCALE_REASON, upscaled)
    geometry = sample_pair_geometry(height, width, seed, cfg.patch_size,
                                    cfg.gap, cfg.jitter)
    corners = geometry['corners']
    features = {
        'index': tf.cast(index, tf.int64),
        'corners': corners,
        'image_size': tf.stack([height, width]),
        'upscaled': upscaled,
    }
    if cfg.device_preprocessing:
      features.update(self._window_sources(image, height, width, corners,
                                           seed))
      return features, {'label': geometry['label']}
    if cfg.fast_preprocessing:
      crops = tf.unstack(windows.resized_windows(image, height, width,
                                                 corners, cfg.patch_size))
    else:
      resized = tf.image.resize(tf.cast(image, tf.float32), [height, width],
                                method='bilinear', antialias=True)
      resized = tf.clip_by_value(resized, 0.0, 255.0)
      crops = [patches.crop(resized, corners[i, 0], corners[i, 1],
                            cfg.patch_size) for i in range(2)]
    if not cfg.harmonize:
      draws = [color_drop_draws(patch, patch_seed(seed, i))
               for i, patch in enumerate(crops)]
      crops = [mixed for mixed, _ in draws]
      features['kept_channels'] = tf.stack([keep for _, keep in draws])
    features['patches'] = tf.stack(crops)
    features = self.device_inputs(features, {}, on_host=True)[0]
    return features, {'label': geometry['label']}

  def _window_sources(self, image, height, width, corners, seed):
    """With device_preprocessing: the source pixels of both windows
    (`windows.cut`, as window_* features) and, with colour dropping, of the
    kept channel alone, with the noise's key and counter."""
    cfg = self.config
    size = cfg.patch_size

    def _on_host(im, resized, corner):
      return windows.resized_windows(im, resized[0], resized[1],
                                     corner[tf.newaxis], size)[0]

    features, channels = {}, None
    if not cfg.harmonize:
      seeds = [patch_seed(seed, i) for i in range(2)]
      channels = tf.stack([kept_channel(s) for s in seeds])
      features['kept_channels'] = channels
      keys, counters = zip(*map(noise_key_counter, seeds))
      features['noise_key'] = tf.stack(keys)
      features['noise_counter'] = tf.stack(counters)
    cut = windows.cut(image, tf.stack([height, width]), corners, size,
                      cfg.region_size, _on_host, channels)
    features.update({'window_' + k: v for k, v in cut.items()})
    return features

  def device_inputs(self, features, labels, on_host=False):
    """Each patch's colour dropping (or harmonized lightness) and VGG
    preprocessing, and with device_preprocessing the windows themselves:
    inside the compiled step with device_preprocessing, else per example in
    the input pipeline."""
    if not (on_host or self.config.device_preprocessing):
      return features, labels
    features = dict(features)
    if 'window_region' in features:
      patch = windows.resample(
          **{k: features.pop('window_' + k) for k in windows.CUT_KEYS},
          size=self.config.patch_size)
    else:
      patch = tf.cast(features['patches'], tf.float32)
    if self.config.harmonize:
      patch = color.lightness_as_rgb(patch,
                                     fast=self.config.fast_preprocessing)
    else:
      keep = features.pop('kept_channels')
      if 'noise_key' in features:
        patch = noise_in_dropped(patch, keep, features.pop('noise_key'),
                                 features.pop('noise_counter'))
      patch = normalize_color_drop(patch, keep)
    features['patches'] = preprocessing.vgg_preprocess(patch)
    return features, labels

  def make_dataset(self, source, batch_size, seed, start=0):
    counter = source.counter

    def _example(index, image):
      return self.example(index, image, seed, counter)

    ds = problems.map_examples(source, seed, start, _example,
                               num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(
        tf.data.AUTOTUNE)

  def trunk_images(self, features):
    return patches.flatten_groups(features['patches'])

  def build_head(self):
    cfg = self.config
    return RelativePositionHead(
        NUM_CLASSES, unit_depths=cfg.unit_depths,
        unit_bottleneck=cfg.unit_bottleneck, fc_depth=cfg.fc_depth,
        fc_bottleneck=cfg.fc_bottleneck, num_fc_units=cfg.num_fc_units,
        weight_decay=cfg.weight_decay, name='rp_head')

  def _per_example_loss(self, labels, outputs):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels['label'], tf.int32),
        logits=tf.cast(outputs, tf.float32))

  def loss(self, labels, outputs):
    return tf.reduce_mean(self._per_example_loss(labels, outputs))

  def build_metrics(self):
    return {'accuracy': tf_keras.metrics.SparseCategoricalAccuracy('accuracy'),
            'loss': tf_keras.metrics.Mean('loss')}

  def update_metrics(self, metrics, labels, outputs):
    metrics['accuracy'].update_state(labels['label'],
                                     tf.cast(outputs, tf.float32))
    metrics['loss'].update_state(self._per_example_loss(labels, outputs))

  def image_summaries(self, features, labels, outputs):
    del labels, outputs
    pair = patches.for_display(features['patches'])
    # The two patches side by side, first on the left.
    return {'rp/pairs': tf.concat([pair[:, 0], pair[:, 1]], axis=2)}
