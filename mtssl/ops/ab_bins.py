"""The quantized ab colour space of colorization (Zhang, Isola & Efros 2016).

The 313 bins (Zhang et al.'s released list), soft encoding of targets,
class-rebalancing weights, the colour prior and its file format, and
annealed-mean decoding. Choices: BUILD.md, "Colorization".

Typical use:

    indices, weights = soft_encode(ab)   # k = 5 nearest bins, sigma 5
    w = rebalancing_weights(load_prior(default_prior_path()))
    ab = annealed_mean(logits)                      # T = 0.38
"""

import functools
import hashlib
import io
import json
import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from mtssl.utils import io_utils
from mtssl.ops import color

NUM_BINS = 313        # Q of Zhang et al.
GRID_STEP = 10.0      # ab grid step of the bin centres
SIGMA = 5.0           # soft encoding and prior smoothing, ab units
REBALANCE_LAMBDA = 0.5
ANNEALED_TEMPERATURE = 0.38

_GRID_LIMIT = 150     # candidate centres span [-150, 150]^2 (the gamut: ~[-110, 100])
_GAMUT_L_STEPS = 401  # L in [0, 100], step 0.25, for the inside test
_ROUND_TRIP_TOLERANCE = 0.01
_PRIORS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'priors')


class ColorPriorError(ValueError):
  """A colour prior file that is missing or cannot be used."""


class AbBinsError(ValueError):
  """An ab bin file that cannot be used."""


def _cube_surface_rgb() -> np.ndarray:
  """Every 8-bit colour on the surface of the RGB cube, float32 in [0, 1]."""
  v = np.arange(256, dtype=np.float32) / 255.0
  u, w = (x.ravel() for x in np.meshgrid(v, v, indexing='ij'))
  faces = []
  for channel in range(3):
    for value in (0.0, 1.0):
      columns = [u, w]
      columns.insert(channel, np.full_like(u, value))
      faces.append(np.stack(columns, axis=1))
  return np.concatenate(faces)


def _candidate_grid() -> np.ndarray:
  axis = np.arange(-_GRID_LIMIT, _GRID_LIMIT + 1, GRID_STEP)
  a, b = np.meshgrid(axis, axis, indexing='ij')
  return np.stack([a.ravel(), b.ravel()], axis=1)


@functools.lru_cache(maxsize=None)
def gamut_distances() -> Tuple[np.ndarray, np.ndarray]:
  """(grid [G, 2], distance [G]) of every candidate grid point to the sRGB region.

  Distance 0: for some L in [0, 100] (step 0.25) the Lab colour survives
  Lab -> sRGB (clipped) -> Lab within 0.01. Otherwise: the ab distance to the
  nearest 8-bit colour on the surface of the RGB cube. Read-only arrays.
  """
  from scipy import spatial  # pylint: disable=g-import-not-at-top
  with tf.init_scope():  # Eager even when first needed inside a graph.
    return _gamut_distances(spatial)


def _gamut_distances(spatial):
  grid = _candidate_grid()
  lightness = np.linspace(0.0, 100.0, _GAMUT_L_STEPS)
  lab = np.concatenate([
      np.broadcast_to(lightness[None, :, None], (len(grid), len(lightness), 1)),
      np.broadcast_to(grid[:, None, :], (len(grid), len(lightness), 2))],
                       axis=-1).astype(np.float32)
  round_trip = color.rgb_to_lab(color.lab_to_rgb(lab)).numpy()
  inside = np.any(np.max(np.abs(round_trip - lab), axis=-1)
                  < _ROUND_TRIP_TOLERANCE, axis=1)
  surface_ab = color.rgb_to_lab(_cube_surface_rgb()).numpy()[:, 1:]
  outside_distance, _ = spatial.cKDTree(surface_ab.astype(np.float64)).query(grid)
  distance = np.where(inside, 0.0, outside_distance)
  grid.setflags(write=False)
  distance.setflags(write=False)
  return grid, distance


@functools.lru_cache(maxsize=None)
def gamut_ab_bins() -> np.ndarray:
  """The Q grid points nearest to the sRGB ab region, float32 [313, 2].

  Distance as in `gamut_distances`, ties broken by (a, b); sorted by (a, b).
  Not the training bins (see `ab_bins`).
  """
  grid, distance = gamut_distances()
  nearest = np.lexsort((grid[:, 1], grid[:, 0], distance))[:NUM_BINS]
  bins = grid[nearest]
  bins = bins[np.lexsort((bins[:, 1], bins[:, 0]))].astype(np.float32)
  bins.setflags(write=False)
  return bins


def default_bins_path() -> str:
  """Zhang et al.'s 313 bin centres (int64 [313, 2]), shipped with the package."""
  return os.path.join(_PRIORS_DIR, 'zhang_ab_bins_313.npy')


def load_bins(path: str) -> np.ndarray:
  """Reads and checks a bin list: 313 distinct (a, b) multiples of 10 -> float32."""
  if not os.path.isfile(path):
    raise AbBinsError(f'ab bin file {path!r} does not exist.')
  try:
    bins = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise AbBinsError(f'ab bin file {path!r} is not a readable .npy array: '
                      f'{str(e).splitlines()[0]}') from None
  problem = None
  if bins.shape != (NUM_BINS, 2):
    problem = f'expected shape ({NUM_BINS}, 2), got {bins.shape}'
  elif not np.issubdtype(bins.dtype, np.number):
    problem = f'expected numbers, got dtype {bins.dtype}'
  elif not np.all(np.isfinite(bins)) or np.any(np.mod(bins, GRID_STEP) != 0):
    problem = f'the centres are not all multiples of {GRID_STEP:g}'
  elif len(np.unique(bins, axis=0)) != NUM_BINS:
    problem = 'some centres are repeated'
  if problem:
    raise AbBinsError(f'ab bin file {path!r} is malformed: {problem}.')
  return bins.astype(np.float32)


def bins_provenance() -> dict:
  """{'file', 'sha256'} of the shipped bin list, for the metadata of priors."""
  path = default_bins_path()
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {'file': os.path.basename(path), 'sha256': digest}


@functools.lru_cache(maxsize=None)
def ab_bins() -> np.ndarray:
  """The Q = 313 bin centres of Zhang et al., float32 [313, 2] (a, b), their order."""
  bins = load_bins(default_bins_path())
  bins.setflags(write=False)
  return bins


def _bins_tensor():
  return tf.constant(ab_bins(), tf.float32)


def _squared_distances(ab):
  """|ab - c_q|^2 for every bin: (..., 2) -> (..., 313), float32.

  Written per component, (a - a_q)^2 + (b - b_q)^2: the same sums as a
  reduction over a trailing axis of 2, bit for bit, without the (..., 313, 2)
  intermediate (6x faster on CPU; tests/test_optimizations.py).
  """
  ab = tf.cast(ab, tf.float32)
  bins = _bins_tensor()
  da = ab[..., 0:1] - bins[:, 0]
  db = ab[..., 1:2] - bins[:, 1]
  return da * da + db * db


def nearest_bin(ab):
  """Index of the nearest bin of every ab value: (..., 2) -> int32 (...)."""
  return tf.argmin(_squared_distances(ab), axis=-1, output_type=tf.int32)


def soft_encode(ab, num_neighbors: int = 5, sigma: float = SIGMA):
  """Soft encoding of ab targets over their k nearest bins.

  Args:
    ab: float (..., 2), any leading shape (a batch of target maps).
    num_neighbors: k, the number of bins that share each target.
    sigma: standard deviation of the Gaussian weighting, in ab units.

  Returns:
    (indices int32 (..., k), weights float32 (..., k)): bins ordered nearest
    first; weights exp(-d^2 / (2 sigma^2)) normalized to sum to 1.
  """
  if not 1 <= num_neighbors <= NUM_BINS:
    raise ValueError(f'num_neighbors must be in [1, {NUM_BINS}], got '
                     f'{num_neighbors}.')
  negative, indices = tf.math.top_k(-_squared_distances(ab), k=num_neighbors)
  # Relative to the nearest bin, so the weights never all underflow.
  logits = (negative - negative[..., :1]) / (2.0 * sigma * sigma)
  return indices, tf.nn.softmax(logits, axis=-1)


def decode_soft_encoding(indices, weights):
  """The mean ab of a soft encoding: (..., k) indices and weights -> (..., 2)."""
  centres = tf.gather(_bins_tensor(), indices)
  return tf.reduce_sum(centres * weights[..., None], axis=-2)


def dense_encoding(indices, weights):
  """A sparse soft encoding as dense 313-way distributions (..., 313)."""
  one_hot = tf.one_hot(indices, NUM_BINS, dtype=tf.float32)
  return tf.reduce_sum(one_hot * weights[..., None], axis=-2)


def annealed_mean(logits, temperature: float = ANNEALED_TEMPERATURE):
  """ab prediction from 313-way logits: (..., 313) -> float32 (..., 2)."""
  if temperature <= 0:
    raise ValueError(f'temperature must be positive, got {temperature}.')
  probs = tf.nn.softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)
  return tf.einsum('...q,qc->...c', probs, _bins_tensor())


# Class rebalancing and the prior ------------------------------------------


def smooth_histogram(counts, sigma: float = SIGMA) -> np.ndarray:
  """Histogram over the bins -> smoothed probabilities p~ (float64 [313])."""
  counts = np.asarray(counts, np.float64)
  if counts.shape != (NUM_BINS,):
    raise ValueError(f'Expected {NUM_BINS} bin counts, got shape {counts.shape}.')
  if not np.all(np.isfinite(counts)) or np.any(counts < 0) or counts.sum() <= 0:
    raise ValueError('Bin counts must be finite, non-negative and not all zero.')
  bins = ab_bins().astype(np.float64)
  squared = np.sum(np.square(bins[:, None, :] - bins[None, :, :]), axis=-1)
  smoothed = np.exp(-squared / (2.0 * sigma * sigma)) @ counts
  return smoothed / smoothed.sum()


def rebalancing_weights(prior, rebalance_lambda: float = REBALANCE_LAMBDA
                        ) -> np.ndarray:
  """w_q proportional to ((1 - lambda) p~_q + lambda / Q)^-1 with E_p~[w] = 1."""
  prior = np.asarray(prior, np.float64)
  if not 0.0 < rebalance_lambda <= 1.0:
    raise ValueError(f'rebalance_lambda must be in (0, 1], got '
                     f'{rebalance_lambda}.')
  weights = 1.0 / ((1.0 - rebalance_lambda) * prior + rebalance_lambda / NUM_BINS)
  return weights / np.sum(prior * weights)


def default_prior_path() -> str:
  """The prior of the built-in synthetic data, shipped with the package."""
  return os.path.join(_PRIORS_DIR, 'synthetic_ab_prior.npy')


def save_prior(path: str, prior, metadata: Optional[dict] = None) -> None:
  """Writes the prior (.npy) and, with metadata, `<path minus .npy>.json`."""
  prior = np.asarray(prior, np.float64)
  _check_prior(prior, path)
  buffer = io.BytesIO()
  np.save(buffer, prior, allow_pickle=False)
  io_utils.atomic_write_bytes(path, buffer.getvalue())
  if metadata is not None:
    io_utils.atomic_write_json(os.path.splitext(path)[0] + '.json', metadata)


def _check_prior(prior: np.ndarray, path: str) -> None:
  problem = None
  if prior.shape != (NUM_BINS,):
    problem = f'expected shape ({NUM_BINS},) (one probability per ab bin), got {prior.shape}'
  elif not np.issubdtype(prior.dtype, np.floating):
    problem = f'expected floating-point probabilities, got dtype {prior.dtype}'
  elif not np.all(np.isfinite(prior)):
    problem = 'it contains NaN or infinite values'
  elif np.any(prior < 0):
    problem = f'it contains negative probabilities (min {prior.min():.3g})'
  elif abs(prior.sum() - 1.0) > 1e-3:
    problem = f'its probabilities sum to {prior.sum():.6g}, not 1'
  if problem:
    raise ColorPriorError(f'Colour prior {path!r} is malformed: {problem}.')


def load_prior(path: str) -> np.ndarray:
  """Reads and checks a prior written by `save_prior`; float64 [313], sums to 1."""
  if not path:
    raise ColorPriorError('No colour prior file given (an empty path); the '
                          f'built-in one is {default_prior_path()!r}.')
  if not os.path.isfile(path):
    raise ColorPriorError(
        f'Colour prior {path!r} does not exist. Estimate one with '
        f'tools/estimate_color_prior.py, or use the built-in prior '
        f'{default_prior_path()!r}.')
  try:
    prior = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ColorPriorError(f'Colour prior {path!r} is not a readable .npy '
                          f'array: {str(e).splitlines()[0]}') from None
  _check_prior(prior, path)
  return (prior / prior.sum()).astype(np.float64)


def read_prior_metadata(path: str) -> dict:
  """The .json written beside a prior, or {} when there is none."""
  meta = os.path.splitext(path)[0] + '.json'
  if not os.path.isfile(meta):
    return {}
  with open(meta, encoding='utf-8') as f:
    return json.load(f)
