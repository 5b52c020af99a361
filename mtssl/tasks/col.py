"""Colorization (Zhang, Isola & Efros 2016; paper sections 2 and 3.4).

From the lightness of a 256x256 crop, predict a 313-way ab distribution
(mtssl.ops.ab_bins) per 8x8 cell. Holds `ColConfig`, the pipeline, the head,
the rebalanced loss, metrics, prior estimation and colorizing helpers.
Choices: BUILD.md, "Colorization".

Typical use:

    task = tasks.make_task('col')          # paper defaults, built-in prior
    rgb = colorize_images(model, images)   # a trained model; uint8 RGB
"""

import dataclasses
import os
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.configs import base as config_base
from mtssl.utils import io_utils
from mtssl.ops import preprocessing
from mtssl.backbones import slim_layers
from mtssl.backbones import slim_checkpoint
from mtssl.data import problems
from mtssl.ops import ab_bins
from mtssl.ops import color
from mtssl.tasks import base
from mtssl.tasks import heads

# Forward G multiply-accumulates of the paper's colorization head per
# 256x256 image, the reference count of the paper's model.
PAPER_HEAD_GMACS = 35.7

_SEED_SALT = 0xC01  # Separates this task's per-example draws from other tasks'.
SKIP_REASON = 'col_skipped_grayscale'


@dataclasses.dataclass
class ColConfig(base.TaskConfig):
  """Colorization settings; defaults are the paper's."""
  image_size: int = config_base.field(
      256, 'side of the square input crop in pixels (paper: 256)')
  target_stride: int = config_base.field(
      8, 'output stride of the trunk; targets are ab averaged over cells of '
      'this size (paper: 8)')
  num_neighbors: int = config_base.field(
      5, 'ab bins of the soft encoding of each target (Zhang et al.: 5)')
  sigma: float = config_base.field(
      ab_bins.SIGMA, 'Gaussian of the soft encoding, in ab units')
  rebalance_lambda: float = config_base.field(
      ab_bins.REBALANCE_LAMBDA, 'class rebalancing: weight of the uniform '
      'distribution mixed into the prior (1 = no rebalancing)')
  prior_path: str = config_base.field(
      None, 'colour prior of the training data (.npy from '
      'tools/estimate_color_prior.py); default: the built-in synthetic one',
      default_factory=ab_bins.default_prior_path)
  temperature: float = config_base.field(
      ab_bins.ANNEALED_TEMPERATURE, 'softmax temperature of the annealed-mean '
      'colour decoding (summaries, tools/colorize.py)')
  head_widths: Tuple[int, ...] = config_base.field(
      (4096, 4096), 'widths of the head: a 2x2 conv, then 1x1 convs')
  head_batch_norm: bool = config_base.field(
      True, 'batch norm in the head (else conv + bias + ReLU)')
  min_chroma: float = config_base.field(
      3.0, 'images whose max |a|,|b| is below this are grayscale: skipped '
      'and counted')
  random_flip: bool = config_base.field(True, 'random horizontal flips')
  summary_images: int = config_base.field(
      3, 'images in each TensorBoard colorization summary')
  fast_preprocessing: bool = config_base.field(
      True, 'the same values with cheaper kernels (module docstring)')
  device_preprocessing: bool = config_base.field(
      False, 'Lab conversion, targets and their soft encoding inside the '
      'compiled training step: the input pipeline yields uint8 crops (the '
      'grayscale test reads a table of all colours)')

  def validate(self):
    super().validate()
    if self.target_stride <= 0 or self.image_size <= 0:
      raise ValueError('image_size and target_stride must be positive, got '
                       f'{self.image_size} and {self.target_stride}.')
    if self.image_size % self.target_stride:
      raise ValueError(f'image_size {self.image_size} must be a multiple of '
                       f'target_stride {self.target_stride}.')
    if not 1 <= self.num_neighbors <= ab_bins.NUM_BINS:
      raise ValueError(f'num_neighbors must be in [1, {ab_bins.NUM_BINS}], '
                       f'got {self.num_neighbors}.')
    if self.sigma <= 0 or self.temperature <= 0:
      raise ValueError(f'sigma and temperature must be positive, got '
                       f'{self.sigma} and {self.temperature}.')
    if not 0 < self.rebalance_lambda <= 1:
      raise ValueError(f'rebalance_lambda must be in (0, 1], got '
                       f'{self.rebalance_lambda}.')
    if not self.head_widths or any(int(w) <= 0 for w in self.head_widths):
      raise ValueError(f'head_widths must be positive widths, got '
                       f'{self.head_widths}.')
    if self.min_chroma < 0 or self.summary_images < 0:
      raise ValueError('min_chroma and summary_images must be >= 0.')


# Preprocessing ops (each works eagerly and inside tf.data) -----------------


def example_seed(seed, index):
  """The stateless seed of the example at stream position `index`."""
  pair = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
  return tf.random.experimental.stateless_fold_in(pair, _SEED_SALT)


def square_crop(image, size: int, seed=None, random_flip: bool = True):
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side to size, crop.

  With `seed` (a stateless seed pair) the crop is at a random offset and
  flipped with probability 1/2 (when `random_flip`); without, it is the
  centre crop.
  """
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  scale = size / tf.cast(tf.minimum(height, width), tf.float32)
  new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(height, tf.float32) * scale),
                                   tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(width, tf.float32) * scale),
                                   tf.int32))

  def _resize():
    resized = tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w],
                              method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

  needs_resize = tf.not_equal(tf.minimum(height, width), size)
  image = tf.cond(needs_resize, _resize, lambda: tf.cast(image, tf.uint8))
  if seed is None:
    top, left = (new_h - size) // 2, (new_w - size) // 2
    flip = tf.constant(False)
  else:
    draws = tf.random.stateless_uniform([3], seed=seed)
    top = tf.cast(draws[0] * tf.cast(new_h - size + 1, tf.float32), tf.int32)
    left = tf.cast(draws[1] * tf.cast(new_w - size + 1, tf.float32), tf.int32)
    top = tf.minimum(top, new_h - size)
    left = tf.minimum(left, new_w - size)
    flip = tf.logical_and(tf.constant(random_flip), draws[2] < 0.5)
  crop = image[top:top + size, left:left + size, :]
  crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
  crop.set_shape([size, size, 3])
  return crop


def ab_targets(lab, stride: int):
  """Mean ab of every stride x stride cell: (..., H, W, 3) Lab -> (..., H/s, W/s, 2)."""
  lab = tf.convert_to_tensor(lab, tf.float32)
  ab = lab[..., 1:]
  batched = ab if ab.shape.rank == 4 else ab[None]
  pooled = tf.nn.avg_pool2d(batched, stride, stride, 'VALID')
  return pooled if ab.shape.rank == 4 else pooled[0]


def has_chroma(lab, min_chroma: float):
  """False for an image without colour: max |a|, |b| below min_chroma."""
  return tf.reduce_max(tf.abs(tf.convert_to_tensor(lab, tf.float32)[..., 1:])) >= min_chroma


def gray_lightness(trunk_images):
  """Trunk inputs (vgg_preprocess(lightness_as_rgb(x))) -> L in [0, 100], (..., 1)."""
  return preprocessing.vgg_unpreprocess(trunk_images)[..., :1] * (100.0 / 255.0)


def colorize(trunk_images, logits, temperature: float = ab_bins.ANNEALED_TEMPERATURE):
  """RGB in [0, 1] from the gray trunk inputs [N, H, W, 3] and logits [N, h, w, 313]."""
  lightness = gray_lightness(trunk_images)
  ab = ab_bins.annealed_mean(logits, temperature)
  ab = tf.image.resize(ab, tf.shape(lightness)[1:3], method='bilinear')
  return color.lab_to_rgb(tf.concat([lightness, ab], axis=-1))


def comparison_panels(trunk_images, logits, truth_rgb,
                      temperature: float = ab_bins.ANNEALED_TEMPERATURE):
  """gray input | prediction | truth side by side: float [N, H, 3W, 3] in [0, 1]."""
  gray = tf.clip_by_value(
      preprocessing.vgg_unpreprocess(trunk_images) / 255.0, 0.0, 1.0)
  predicted = colorize(trunk_images, logits, temperature)
  truth = tf.cast(truth_rgb, tf.float32) / 255.0
  return tf.concat([gray, predicted, truth], axis=2)


# Head ------------------------------------------------------------------------


class ColorizationHead(heads.ConvStackHead):
  """conv 2x2 -> conv 1x1 (... ) -> conv 1x1 313 logits, all stride 1."""

  def __init__(self, widths: Sequence[int] = (4096, 4096),
               num_bins: int = ab_bins.NUM_BINS, batch_norm: bool = True,
               weight_decay: float = slim_layers.WEIGHT_DECAY, **kwargs):
    kwargs.setdefault('name', 'col_head')
    kernel_sizes = [2] + [1] * (len(widths) - 1)
    super().__init__(widths, kernel_sizes, num_bins, batch_norm=batch_norm,
                     weight_decay=weight_decay, **kwargs)


# The task --------------------------------------------------------------------


@base.register
class ColorizationTask(base.Task):
  """Colorization: L in, 313-way ab bin distribution per 8x8 region out."""

  name = 'col'
  config_class = ColConfig
  paper_epoch_gpu_hours = 90.0
  cpu_overrides = {'head_widths': (256, 256)}
  paper_trunk_inputs = (1, (256, 256))
  gpu_overrides = {'batch_size': 64, 'device_preprocessing': True}
  head_fields = ('image_size', 'head_widths', 'target_stride')

  def paper_head_gmacs(self, trunk_images):
    del trunk_images
    return PAPER_HEAD_GMACS
  # The paper gives one ImageNet epoch as ~90 K40 GPU-hours but no batch
  # size, so no per-step cost is claimed here (the trainer measures it).

  def __init__(self, config=None, load_prior: bool = True):
    """`load_prior=False` only for estimating a prior (no loss without one)."""
    super().__init__(config)
    self.prior_path = self.config.prior_path
    self.prior = self.class_weights = None
    if load_prior:
      self.prior = ab_bins.load_prior(self.prior_path)
      self.class_weights = ab_bins.rebalancing_weights(
          self.prior, self.config.rebalance_lambda).astype(np.float32)

  # Inputs ----------------------------------------------------------------
  def _crop(self, index, image, seed):
    cfg = self.config
    return square_crop(image, cfg.image_size, example_seed(seed, index),
                       cfg.random_flip)

  def _from_crops(self, crop):
    """(trunk input, ab targets, Lab) of a uint8 crop or a batch of them."""
    fast = self.config.fast_preprocessing
    lab = color.rgb_to_lab(tf.cast(crop, tf.float32) / 255.0, fast=fast)
    gray = (color.lab_lightness_as_rgb(lab) if fast
            else color.lightness_as_rgb(crop))
    return (preprocessing.vgg_preprocess(gray),
            ab_targets(lab, self.config.target_stride), lab)

  def _example(self, index, image, seed):
    crop = self._crop(index, image, seed)
    trunk_input, ab, lab = self._from_crops(crop)
    features = {'index': index, 'image': trunk_input}
    labels = {'image': crop, 'ab': ab}
    return features, labels, has_chroma(lab, self.config.min_chroma)

  def _crop_example(self, index, image, seed, table):
    """The crop alone, for device_preprocessing; the same grayscale test."""
    crop = self._crop(index, image, seed)
    return {'index': index, 'crop': crop}, {}, color.has_chroma_by_table(
        crop, table)

  def examples(self, source, seed: int, start: int = 0,
               crops: bool = False) -> tf.data.Dataset:
    """Unbatched (features, labels) before soft encoding (`crops`: uint8
    crops, see `device_inputs`); grayscale images skipped."""
    make = self._example
    if crops:
      table = color.chroma_table(self.config.min_chroma,
                                 self.config.fast_preprocessing)
      make = lambda k, image, seed: self._crop_example(k, image, seed, table)
    ds = problems.map_examples(
        source, seed, start, lambda k, image: make(k, image, seed),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = problems.filter_counted(ds, source.counter, lambda f, l, ok: ok,
                                 SKIP_REASON)
    return ds.map(lambda f, l, ok: (f, l))

  def encode_targets(self, features, labels):
    """Adds the soft encoding of labels['ab'] (batched or not) to the labels."""
    indices, weights = ab_bins.soft_encode(labels['ab'], self.config.num_neighbors,
                                           self.config.sigma)
    return features, dict(labels, bins=indices, bin_weights=weights)

  def make_dataset(self, source, batch_size, seed, start=0):
    device = self.config.device_preprocessing
    ds = self.examples(source, seed, start, crops=device).batch(
        batch_size, drop_remainder=True)
    if not device:
      ds = ds.map(tf.autograph.experimental.do_not_convert(self.encode_targets),
                  num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  def device_inputs(self, features, labels):
    """With device_preprocessing: a batch of crops -> the trunk input, the
    targets and their soft encoding (what the host path makes per example)."""
    if not self.config.device_preprocessing:
      return features, labels
    features = dict(features)
    crop = features.pop('crop')
    trunk_input, ab, _ = self._from_crops(crop)
    features['image'] = trunk_input
    return self.encode_targets(features, dict(labels, image=crop, ab=ab))

  # Model -----------------------------------------------------------------
  def trunk_images(self, features):
    return features['image']

  def build_head(self):
    return ColorizationHead(self.config.head_widths,
                            batch_norm=self.config.head_batch_norm,
                            name='col_head')

  def _check_shapes(self, labels, logits):
    got, want = logits.shape[1:3], labels['bins'].shape[1:3]
    if got.is_fully_defined() and want.is_fully_defined() and got != want:
      raise ValueError(
          f'col: head output is {got.as_list()} but the targets are '
          f'{want.as_list()}; the trunk must run at output stride '
          f'{self.config.target_stride} (image_size {self.config.image_size}).')

  def _pixel_cross_entropy(self, labels, logits):
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    picked = tf.gather(log_probs, labels['bins'], batch_dims=3)
    return -tf.reduce_sum(picked * labels['bin_weights'], axis=-1)

  def pixel_weights(self, labels):
    """Rebalancing weight of every target pixel (at its nearest bin)."""
    if self.class_weights is None:
      raise ValueError('col: this task was made without a colour prior '
                       '(load_prior=False) and has no loss.')
    return tf.gather(tf.constant(self.class_weights), labels['bins'][..., 0])

  def loss(self, labels, outputs):
    self._check_shapes(labels, outputs)
    cross_entropy = self._pixel_cross_entropy(labels, outputs)
    return tf.reduce_mean(cross_entropy * self.pixel_weights(labels))

  # Metrics and summaries ---------------------------------------------------
  def build_metrics(self):
    return {name: tf_keras.metrics.Mean(name)
            for name in ('loss', 'accuracy', 'cross_entropy', 'ab_error')}

  def update_metrics(self, metrics, labels, outputs):
    logits = tf.cast(outputs, tf.float32)
    cross_entropy = self._pixel_cross_entropy(labels, logits)
    metrics['loss'].update_state(
        tf.reduce_mean(cross_entropy * self.pixel_weights(labels)))
    metrics['cross_entropy'].update_state(cross_entropy)
    hit = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32),
                   labels['bins'][..., 0])
    metrics['accuracy'].update_state(tf.cast(hit, tf.float32))
    predicted = ab_bins.annealed_mean(logits, self.config.temperature)
    metrics['ab_error'].update_state(
        tf.norm(predicted - labels['ab'], axis=-1))

  def image_summaries(self, features, labels, outputs):
    n = self.config.summary_images
    if not n:
      return {}
    panels = comparison_panels(features['image'][:n], outputs[:n],
                               labels['image'][:n], self.config.temperature)
    return {'col/gray_prediction_truth': panels}


# Prior estimation (tools/estimate_color_prior.py) ----------------------------


def estimate_prior(task: ColorizationTask, source, num_images: int,
                 seed: int = 0, batch_size: int = 16,
                 sigma: float = ab_bins.SIGMA):
  """Bin histogram and smoothed prior of the targets the task trains on.

  Counts the nearest bin of every target pixel (after cropping, averaging
  to the output stride and skipping grayscale images, exactly as training
  sees them) over `num_images` examples of the stream `seed`.
  Returns (counts int64 [313], prior float64 [313]).
  """
  if num_images <= 0:
    raise ValueError(f'num_images must be positive, got {num_images}.')
  source.validate()
  ds = task.examples(source, seed).take(num_images).batch(batch_size)
  ds = problems.count_in_process(ds, source.counter)
  ds = ds.map(lambda f, l: ab_bins.nearest_bin(l['ab']),
              num_parallel_calls=tf.data.AUTOTUNE)
  counts = np.zeros(ab_bins.NUM_BINS, np.int64)
  for nearest in ds.as_numpy_iterator():
    counts += np.bincount(nearest.ravel(), minlength=ab_bins.NUM_BINS)
  return counts, ab_bins.smooth_histogram(counts, sigma)


# Colorizing images with a model (tools/colorize.py) --------------------------


class ColorizeError(ValueError):
  """A checkpoint or model that cannot colorize."""


def restore_col_model(model, checkpoint: str) -> str:
  """Restores the trunk, the `col` head (and its lasso) of a built model.

  `checkpoint` is a prefix or a directory of checkpoints laid out as
  `tf.train.Checkpoint(backbone=trunk, heads={'col': head}[, lasso={'col': ...}])`,
  i.e. MultiTaskModel.checkpoint_items; other heads and optimizer state in it
  are ignored. Returns the prefix read.
  """
  items = {'backbone': model.trunk, 'heads': {'col': model.heads['col']}}
  if 'col' in model.lasso:
    items['lasso'] = {'col': model.lasso['col']}
  return slim_checkpoint.restore_objects(
      checkpoint, items, 'this trunk and col head', error_class=ColorizeError)


def colorize_images(model, images: Sequence[np.ndarray]) -> np.ndarray:
  """Colorizes RGB uint8 images with model's `col` task; uint8 panels [N, S, 3S, 3].

  Each image is centre-cropped to the task's image_size (shorter side
  resized first), converted to gray, run through trunk and head, and shown
  as gray input | prediction | original.
  """
  task = model.tasks['col']
  size = task.config.image_size
  crops = tf.stack([square_crop(image, size) for image in images])
  features = {'index': tf.range(len(images), dtype=tf.int64),
              'image': preprocessing.vgg_preprocess(color.lightness_as_rgb(crops))}
  logits = model.task_outputs('col', features, training=False)
  panels = comparison_panels(features['image'], logits, crops,
                             task.config.temperature)
  return tf.cast(tf.round(panels * 255.0), tf.uint8).numpy()


def write_panels(panels: np.ndarray, output_dir: str,
                 prefix: str = 'colorized') -> List[str]:
  """Writes each panel as `<output_dir>/<prefix>_NNNN.png` (atomically)."""
  paths = []
  for i, panel in enumerate(panels):
    ok, encoded = cv2.imencode('.png', cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    if not ok:
      raise ColorizeError(f'Could not encode panel {i} as PNG.')
    path = os.path.join(output_dir, f'{prefix}_{i:04d}.png')
    io_utils.atomic_write_bytes(path, encoded.tobytes())
    paths.append(path)
  return paths
