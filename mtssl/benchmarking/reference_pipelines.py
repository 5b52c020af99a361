"""Every task's preprocessing written per image with NumPy/OpenCV.

The baseline of the pipeline benchmark and an independent oracle for the
tasks' tf.data pipelines (tests/test_optimizations.py): a reference takes
the example's random draws (`<task>_draws`, read from the task's own
stateless draws, or `sample_<task>` from a NumPy generator) and returns the
same example. Choices: BUILD.md, "Performance".
"""

import resource
import time
from typing import Dict, Optional, Sequence

import cv2
import numpy as np
import tensorflow as tf

from mtssl.ops import preprocessing
from mtssl.ops import ab_bins as ab_bins_lib
from mtssl.ops import color as color_lib
from mtssl.tasks import col as col_lib
from mtssl.tasks import ex as ex_lib
from mtssl.tasks import patches as patches_lib
from mtssl.tasks import rp as rp_lib

VGG_MEAN = np.array(preprocessing.VGG_MEAN_RGB, np.float32)


# Shared operations ----------------------------------------------------------------


def _axis_weights(in_size: int, out_size: int):
  """Source indices [out, span] and weights [out, span] of one axis.

  TensorFlow's ScaleAndTranslate with the triangle kernel and antialiasing:
  output x samples the input at (x + 0.5) / scale; the kernel radius is 1
  widened by 1 / scale when shrinking; taps run from
  ceil(centre - radius - 0.5) to floor(centre + radius - 0.5), clamped to the
  image, with weights normalized to sum to 1.
  """
  scale = np.float32(out_size) / np.float32(in_size)
  inv_scale = float(np.float32(1.0) / scale)
  kernel_scale = max(inv_scale, 1.0)
  span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
  centres = (np.arange(out_size, dtype=np.float64) + 0.5) * inv_scale
  start = np.clip(np.ceil(centres - kernel_scale - 0.5), 0, in_size - 1)
  end = np.clip(np.floor(centres + kernel_scale - 0.5), 0, in_size - 1) + 1
  taps = start[:, None].astype(np.int64) + np.arange(span)
  distance = np.abs(taps + 0.5 - centres[:, None]) / kernel_scale
  weights = np.maximum(0.0, 1.0 - distance) * (taps < end[:, None])
  weights /= weights.sum(axis=1, keepdims=True)
  return np.minimum(taps, in_size - 1), weights.astype(np.float32)


def resize_antialiased(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """tf.image.resize(image, [height, width], 'bilinear', antialias=True)."""
  image = np.asarray(image, np.float32)
  rows, row_weights = _axis_weights(image.shape[0], height)
  out = np.einsum('ok,okwc->owc', row_weights, image[rows])
  cols, col_weights = _axis_weights(image.shape[1], width)
  return np.einsum('pk,opkc->opc', col_weights, out[:, cols])


_RGB_TO_XYZ = np.array(color_lib._RGB_TO_XYZ, np.float32)  # pylint: disable=protected-access
_D65_WHITE = np.array(color_lib._D65_WHITE, np.float32)  # pylint: disable=protected-access
_DELTA = 6.0 / 29.0


def lab(rgb01: np.ndarray) -> np.ndarray:
  """Lab (D65) of float sRGB in [0, 1], the textbook formula in NumPy."""
  rgb = np.asarray(rgb01, np.float32)
  linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = (linear @ _RGB_TO_XYZ.T) / _D65_WHITE
  f = np.where(xyz > _DELTA ** 3, np.cbrt(xyz),
               xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
  return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                   200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def lightness_as_rgb(rgb255: np.ndarray) -> np.ndarray:
  lightness = lab(np.asarray(rgb255, np.float32) / 255.0)[..., :1]
  return np.repeat(lightness * (255.0 / 100.0), 3, axis=-1)


def vgg(rgb255: np.ndarray) -> np.ndarray:
  return np.asarray(rgb255, np.float32) - VGG_MEAN


def _numpy(structure):
  return tf.nest.map_structure(lambda t: np.asarray(t), structure)


# Relative position --------------------------------------------------------------


def rp_resized_shape(height: int, width: int, pixels: int, min_side: int):
  scale = np.sqrt(pixels / (height * width))
  new_h, new_w = max(np.round(height * scale), 1.0), max(np.round(width * scale),
                                                         1.0)
  short = min(new_h, new_w)
  if short < min_side:
    new_h, new_w = np.ceil(new_h * min_side / short), np.ceil(new_w * min_side /
                                                             short)
  return int(new_h), int(new_w)


def rp_draws(task, seed: int, index: int, image_shape) -> Dict[str, np.ndarray]:
  """The draws rp's pipeline makes for stream position `index`."""
  cfg = task.config
  base = patches_lib.example_seed(seed, index, rp_lib._SALT)  # pylint: disable=protected-access
  pixels = patches_lib.uniform_int(
      patches_lib.draw_seed(base, rp_lib._PIXELS), cfg.min_pixels,  # pylint: disable=protected-access
      cfg.max_pixels)
  height, width, _ = rp_lib.resized_shape(image_shape[0], image_shape[1],
                                          pixels, cfg.min_side)
  geometry = rp_lib.sample_pair_geometry(height, width, base, cfg.patch_size,
                                         cfg.gap, cfg.jitter)
  step = cfg.patch_size + cfg.gap
  jitter = patches_lib.uniform_int(patches_lib.draw_seed(base, rp_lib._JITTER),  # pylint: disable=protected-access
                                   -cfg.jitter, cfg.jitter, shape=[2, 2])
  seeds = [rp_lib.patch_seed(base, i) for i in range(2)]
  noise = [tf.random.stateless_uniform(
      [cfg.patch_size, cfg.patch_size, 3],
      seed=patches_lib.draw_seed(s, rp_lib._COLOR_2),  # pylint: disable=protected-access
      minval=-rp_lib.COLOR_DROP_NOISE, maxval=rp_lib.COLOR_DROP_NOISE)
           for s in seeds]
  return _numpy({
      'pixels': pixels, 'origin': geometry['grid_origin'],
      'label': geometry['label'],
      'first': (geometry['grid_points'][0] - geometry['grid_origin']) // step,
      'jitter': jitter, 'kept': tf.stack([rp_lib.kept_channel(s) for s in seeds]),
      'noise': tf.stack(noise)})


def sample_rp(rng: np.random.Generator, image_shape, config) -> Dict[str, object]:
  """rp draws from a NumPy generator, with the pipeline's distributions."""
  pixels = int(rng.integers(config.min_pixels, config.max_pixels + 1))
  size = np.array(rp_resized_shape(image_shape[0], image_shape[1], pixels,
                                   config.min_side))
  step = config.patch_size + config.gap
  origin = np.array([rng.integers(0, min(step - 1, s - config.patch_size - step)
                                  + 1) for s in size])
  grid = (size + config.gap - origin) // step
  label = int(rng.integers(rp_lib.NUM_CLASSES))
  offset = np.array(rp_lib.LABEL_OFFSETS[label])
  low, high = np.maximum(-offset, 0), grid - 1 - np.maximum(offset, 0)
  first = np.array([rng.integers(low[i], high[i] + 1) for i in range(2)])
  p = config.patch_size
  return {'pixels': pixels, 'origin': origin, 'label': label, 'first': first,
          'jitter': rng.integers(-config.jitter, config.jitter + 1, [2, 2]),
          'kept': rng.integers(0, 3, [2]),
          'noise': rng.uniform(-rp_lib.COLOR_DROP_NOISE,
                               rp_lib.COLOR_DROP_NOISE, [2, p, p, 3])}


def _color_drop(patch, kept, noise):
  centred = patch - patch.mean(axis=(0, 1), keepdims=True)
  dropped = np.where(np.arange(3) == kept, centred, noise)
  rms = np.sqrt(np.mean(np.square(dropped)))
  return dropped * (rp_lib.COLOR_DROP_RMS / max(rms, 1e-6)) + VGG_MEAN


def rp_example(image: np.ndarray, draws, config):
  """(features, labels) of one rp example, as rp's pipeline makes it."""
  p, step = config.patch_size, config.patch_size + config.gap
  height, width = rp_resized_shape(image.shape[0], image.shape[1],
                                   int(draws['pixels']), config.min_side)
  resized = np.clip(resize_antialiased(image, height, width), 0.0, 255.0)
  offset = np.array(rp_lib.LABEL_OFFSETS[int(draws['label'])])
  cells = np.stack([draws['first'], draws['first'] + offset])
  points = np.asarray(draws['origin']) + cells * step
  corners = np.clip(points + draws['jitter'], 0,
                    np.array([height, width]) - p)
  pair = []
  for i, (y, x) in enumerate(corners):
    patch = resized[y:y + p, x:x + p]
    if config.harmonize:
      patch = lightness_as_rgb(patch)
    else:
      patch = _color_drop(patch, draws['kept'][i], draws['noise'][i])
    pair.append(vgg(patch))
  features = {'patches': np.stack(pair), 'corners': corners,
              'image_size': np.array([height, width])}
  return features, {'label': int(draws['label'])}


# Colorization ---------------------------------------------------------------------


def col_draws(task, seed: int, index: int, image_shape=None):
  del task, image_shape
  return {'uniform': np.asarray(tf.random.stateless_uniform(
      [3], seed=col_lib.example_seed(seed, index)))}


def sample_col(rng: np.random.Generator, image_shape=None, config=None):
  del image_shape, config
  return {'uniform': rng.random(3, dtype=np.float32)}


def soft_encode(ab: np.ndarray, num_neighbors: int, sigma: float):
  """Per pixel: k nearest of the 313 bins and their Gaussian weights."""
  bins = ab_bins_lib.ab_bins()
  distances = np.square(ab[..., None, :] - bins).sum(axis=-1)
  order = np.argsort(distances, axis=-1, kind='stable')[..., :num_neighbors]
  nearest = np.take_along_axis(distances, order, axis=-1)
  weights = np.exp(-(nearest - nearest[..., :1]) / (2.0 * sigma * sigma))
  return order.astype(np.int32), weights / weights.sum(axis=-1, keepdims=True)


def col_example(image: np.ndarray, draws, config):
  """(features, labels, has colour) of one col example, soft-encoded."""
  size = config.image_size
  height, width = image.shape[:2]
  scale = np.float32(size) / np.float32(min(height, width))
  new_h = max(size, int(np.round(np.float32(height) * scale)))
  new_w = max(size, int(np.round(np.float32(width) * scale)))
  if min(height, width) != size:
    image = np.clip(np.round(resize_antialiased(image, new_h, new_w)), 0,
                    255).astype(np.uint8)
  u = np.asarray(draws['uniform'], np.float32)
  top = min(int(u[0] * np.float32(new_h - size + 1)), new_h - size)
  left = min(int(u[1] * np.float32(new_w - size + 1)), new_w - size)
  crop = image[top:top + size, left:left + size]
  if config.random_flip and u[2] < 0.5:
    crop = crop[:, ::-1]
  lab_crop = lab(crop.astype(np.float32) / 255.0)
  s = config.target_stride
  ab = lab_crop[..., 1:].reshape(size // s, s, size // s, s, 2).mean(axis=(1, 3))
  bins, weights = soft_encode(ab, config.num_neighbors, config.sigma)
  features = {'image': vgg(np.repeat(lab_crop[..., :1] * (255.0 / 100.0), 3,
                                     axis=-1))}
  labels = {'image': np.ascontiguousarray(crop), 'ab': ab, 'bins': bins,
            'bin_weights': weights}
  return features, labels, bool(np.abs(lab_crop[..., 1:]).max() >=
                                config.min_chroma)


# Exemplar -------------------------------------------------------------------------


def ex_draws(task, seed: int, index: int, image_shape=None):
  """The draws ex's pipeline makes for stream position `index`."""
  del image_shape
  cfg = task.config
  base = patches_lib.example_seed(seed, index, ex_lib._SALT)  # pylint: disable=protected-access
  centres = [ex_lib._sample_centre(patches_lib.draw_seed(base, d), cfg)  # pylint: disable=protected-access
             for d in (ex_lib._SEED_CENTRE, ex_lib._CANDIDATE_CENTRE)]  # pylint: disable=protected-access
  view_seeds = [patches_lib.draw_seed(base, ex_lib._VIEW_SEEDS + v)  # pylint: disable=protected-access
                for v in range(3)]
  transforms = [ex_lib.sample_view(s, c, cfg)
                for s, c in zip(view_seeds, [centres[0], centres[0], centres[1]])]
  colors = [ex_lib.color_parameters(
      patches_lib.draw_seed(s, ex_lib._COLOR_SEED), cfg) for s in view_seeds]  # pylint: disable=protected-access
  return _numpy({'centres': tf.stack(centres),
                 'transforms': tf.stack(transforms), 'colors': colors})


def _log_uniform(rng, low, high, size=None):
  return np.exp(rng.uniform(np.log(low), np.log(high), size))


def sample_ex(rng: np.random.Generator, image_shape, config):
  """ex draws from a NumPy generator, with the pipeline's distributions."""
  del image_shape
  half = (config.patch_size - 1) / 2.0
  centres = rng.uniform(half, config.image_size - 1 - half, [2, 2])
  transforms, colors = [], []
  reach = config.max_translation * config.patch_size
  limit = np.radians(config.max_rotation_degrees)
  for centre in (centres[0], centres[0], centres[1]):
    scale = _log_uniform(rng, *config.scale_range)
    angle = rng.uniform(-limit, limit)
    ty, tx = centre + rng.uniform(-reach, reach, 2)
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    transforms.append([cos, -sin, tx - (cos - sin) * half, sin, cos,
                       ty - (sin + cos) * half, 0.0, 0.0])
    colors.append({
        'pca_factors': _log_uniform(rng, *config.pca_factor_range, 3),
        's_power': _log_uniform(rng, *config.sv_power_range),
        's_factor': _log_uniform(rng, *config.sv_factor_range),
        's_shift': rng.uniform(-config.max_sv_shift, config.max_sv_shift),
        'v_power': _log_uniform(rng, *config.sv_power_range),
        'v_factor': _log_uniform(rng, *config.sv_factor_range),
        'v_shift': rng.uniform(-config.max_sv_shift, config.max_sv_shift),
        'hue_shift': rng.uniform(-config.max_hue_shift, config.max_hue_shift)})
  return {'centres': centres, 'transforms': np.array(transforms),
          'colors': colors}


_PCA = np.array(ex_lib.IMAGENET_PCA_EIGENVECTORS, np.float32)
_PCA_INVERSE = ex_lib._PCA_INVERSE.astype(np.float32)  # pylint: disable=protected-access


def ex_color_shift(patch: np.ndarray, params) -> np.ndarray:
  """Dosovitskiy et al.'s colour shift of an RGB patch in [0, 1] (OpenCV HSV)."""
  mean = patch.mean(axis=(0, 1), keepdims=True)
  coordinates = (patch - mean) @ _PCA_INVERSE.T * np.asarray(
      params['pca_factors'], np.float32)
  patch = np.clip(mean + coordinates @ _PCA.T, 0.0, 1.0).astype(np.float32)
  hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)  # H in degrees, S and V in [0, 1]
  hue = np.mod(hsv[..., 0] / 360.0 + params['hue_shift'], 1.0)
  sat, val = (np.clip(x ** params[f'{n}_power'] * params[f'{n}_factor'] +
                      params[f'{n}_shift'], 0.0, 1.0)
              for x, n in ((hsv[..., 1], 's'), (hsv[..., 2], 'v')))
  return cv2.cvtColor(np.stack([hue * 360.0, sat, val], axis=-1).astype(
      np.float32), cv2.COLOR_HSV2RGB)


def ex_example(image: np.ndarray, draws, config):
  """Features of one ex example (three views, before the batch's triplet
  arrangement)."""
  size, p = config.image_size, config.patch_size
  resized = np.clip(resize_antialiased(np.asarray(image, np.float32) / 255.0,
                                       size, size), 0.0, 1.0)
  views = []
  for transform, params in zip(draws['transforms'], draws['colors']):
    matrix = np.asarray(transform[:6], np.float64).reshape(2, 3)
    view = cv2.warpAffine(resized, matrix, (p, p),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)
    views.append(ex_color_shift(np.clip(view, 0.0, 1.0), params))
  return {'patches': vgg(np.stack(views) * 255.0),
          'centres': np.asarray(draws['centres']),
          'transforms': np.asarray(draws['transforms'])}


def ex_arrange_triplets(patch_groups: np.ndarray) -> np.ndarray:
  """[B, 3, ...]: the third patch of example i from example i + 1 (mod B)."""
  return np.concatenate([patch_groups[:, :2],
                         np.roll(patch_groups[:, 2:], -1, axis=0)], axis=1)


# Motion segmentation ----------------------------------------------------------------


def ms_example(frame: np.ndarray, label: np.ndarray, config):
  size = (config.frame_height, config.frame_width)
  frame = np.asarray(frame, np.float32)
  if frame.shape[:2] != size:
    frame = np.clip(resize_antialiased(frame, *size), 0.0, 255.0)
  label_size = config.label_size
  mask = np.asarray(label, np.float32)
  if mask.shape != label_size:
    mask = (cv2.resize(mask, label_size[::-1], interpolation=cv2.INTER_AREA)
            >= 0.5).astype(np.float32)
  return {'image': vgg(frame)}, {'mask': mask[..., None]}


# Benchmark baseline -----------------------------------------------------------------


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _per_image(sample, example):
  """A reference that draws and processes each image on its own."""

  def process_images(config, images, labels, count, rng):
    del labels
    out = []
    for k in range(count):
      image = images[k % len(images)]
      out.append(example(image, sample(rng, image.shape, config), config))
    return out

  return process_images


def _ex_process(config, images, labels, count, rng):
  out = _per_image(sample_ex, ex_example)(config, images, labels, count, rng)
  if len(out) > 1:
    ex_arrange_triplets(np.stack([f['patches'] for f in out]))
  return out


def _ms_process(config, images, labels, count, rng):
  del rng
  return [ms_example(images[k % len(images)], labels[k % len(labels)], config)
          for k in range(count)]


# Task name -> process(config, images, labels, count, rng): `count` examples
# from `images` (and their `labels`, for video tasks), cycled.
REFERENCES = {
    'rp': _per_image(sample_rp, rp_example),
    'col': _per_image(sample_col, col_example),
    'ex': _ex_process,
    'ms': _ms_process,
}


def process(name: str, config, images: Sequence[np.ndarray],
            labels: Optional[Sequence[np.ndarray]], count: int,
            rng: np.random.Generator):
  """`count` examples of task `name` from `images` (cycled), reference way."""
  if name not in REFERENCES:
    raise ValueError(f'No reference pipeline for task {name!r}; known: '
                     f'{", ".join(sorted(REFERENCES))}.')
  return REFERENCES[name](config, images, labels, count, rng)


def measure(name: str, task, images, labels=None, count: int = 32,
            seed: int = 0) -> Dict[str, float]:
  """Examples per second (wall and process CPU time) of the reference, on
  one OpenCV thread, after one untimed example."""
  threads = cv2.getNumThreads()
  cv2.setNumThreads(1)
  try:
    rng = np.random.default_rng(seed)
    process(name, task.config, images, labels, 1, rng)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    process(name, task.config, images, labels, count, rng)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  finally:
    cv2.setNumThreads(threads)
  return {'examples': count, 'examples_per_s': round(count / wall, 2),
          'examples_per_cpu_s': round(count / max(cpu, 1e-9), 2)}
