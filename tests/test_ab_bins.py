"""The quantized ab space: bins, soft encoding, rebalancing, prior files, decoding."""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mtssl.ops import ab_bins
from mtssl.ops import color

HALF_DIAGONAL = 5.0 * np.sqrt(2.0)  # farthest a point of a 10 x 10 cell is from its centre


def _random_rgb(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, [n, 3]).astype(np.float32)


def _reachable_ab(n=50_000, surface_step=1):
  """ab of random 8-bit colours and of every colour on the RGB cube's surface.

  The surface colours are the extreme ones (the sRGB region's boundary).
  """
  surface = ab_bins._cube_surface_rgb()[::surface_step]  # pylint: disable=protected-access
  rgb = np.concatenate([_random_rgb(n) / 255.0, surface])
  return color.rgb_to_lab(rgb).numpy()[:, 1:]


def _in_chunks(fn, ab, size=40_000):
  """fn over ab in chunks (soft encoding holds [N, 313, 2] floats)."""
  outputs = [fn(ab[i:i + size]) for i in range(0, len(ab), size)]
  if isinstance(outputs[0], tuple):
    return tuple(np.concatenate([o[j] for o in outputs]) for j in range(len(outputs[0])))
  return np.concatenate(outputs)


class BinsTest(tf.test.TestCase):

  def test_bins_are_the_shipped_list_of_zhang_et_al_in_their_order(self):
    bins = ab_bins.ab_bins()
    path = ab_bins.default_bins_path()
    shipped = np.load(path, allow_pickle=False)
    self.assertEqual(shipped.shape, (313, 2))
    self.assertEqual(bins.dtype, np.float32)
    self.assertAllEqual(bins, shipped.astype(np.float32))  # values and order
    self.assertAllEqual(np.mod(bins, 10), np.zeros_like(bins))
    self.assertLen({tuple(b) for b in bins}, 313)
    self.assertIs(ab_bins.ab_bins(), bins)  # read once per process
    self.assertFalse(bins.flags.writeable)
    # The file is the one its provenance names.
    with open(os.path.splitext(path)[0] + '.json', encoding='utf-8') as f:
      provenance = json.load(f)
    with open(path, 'rb') as f:
      self.assertEqual(hashlib.sha256(f.read()).hexdigest(), provenance['sha256'])
    self.assertEqual((provenance['file'], provenance['dtype'], provenance['shape']),
                     (os.path.basename(path), str(shipped.dtype), [313, 2]))

  def test_gamut_set_is_the_313_points_nearest_to_the_srgb_region(self):
    grid, distance = ab_bins.gamut_distances()
    order = np.sort(distance)
    # Measured: 228 grid points are reachable themselves; the 313th point is
    # 13.25 from the region, the 314th 13.73, so precision cannot flip the set.
    self.assertEqual(int(np.sum(distance == 0)), 228)
    self.assertBetween(order[312], 13.0, 13.5)
    self.assertGreater(order[313] - order[312], 0.4)
    gamut = ab_bins.gamut_ab_bins()
    chosen = {tuple(p) for p in grid[distance <= order[312]].astype(np.float32)}
    self.assertEqual(chosen, {tuple(b) for b in gamut})
    # Zhang et al.'s list holds every reachable grid point, lies within 14.85
    # of the region (measured) and shares 309 bins with the gamut set.
    zhang = {tuple(b) for b in ab_bins.ab_bins()}
    reachable = {tuple(p) for p in grid[distance == 0].astype(np.float32)}
    self.assertEqual(reachable - zhang, set())
    near = {tuple(p) for p in grid[distance < 14.9].astype(np.float32)}
    self.assertEqual(zhang - near, set())
    self.assertLen(zhang & {tuple(b) for b in gamut}, 309)

  def test_bin_file_errors_name_the_file_and_the_problem(self):
    tmp = self.get_temp_dir()
    good = np.load(ab_bins.default_bins_path())

    def npy(name, array):
      path = os.path.join(tmp, name)
      np.save(path, array)
      return path

    text = os.path.join(tmp, 'text.npy')
    with open(text, 'wb') as f:
      f.write(b'not an array')
    repeated = good.copy()
    repeated[1] = repeated[0]
    cases = [
        (os.path.join(tmp, 'missing.npy'), 'does not exist'),
        (text, 'not a readable .npy'),
        (npy('shape.npy', good[:312]), r'shape \(313, 2\).*\(312, 2\)'),
        (npy('off_grid.npy', good + 5), 'multiples of 10'),
        (npy('repeated.npy', repeated), 'repeated'),
        (npy('strings.npy', good.astype(str)), 'dtype <U'),
    ]
    for path, problem in cases:
      with self.assertRaisesRegex(ab_bins.AbBinsError, f"'{path}'.*{problem}",
                                  msg=path):
        ab_bins.load_bins(path)
    self.assertAllEqual(ab_bins.load_bins(npy('ok.npy', good)), ab_bins.ab_bins())

  def test_every_srgb_colour_lies_in_the_cell_of_a_bin(self):
    ab = _reachable_ab()
    nearest = ab_bins.ab_bins()[_in_chunks(ab_bins.nearest_bin, ab)]
    self.assertLessEqual(np.max(np.abs(nearest - ab)), 5.0 + 1e-3)
    cells = np.round(ab / 10.0) * 10.0
    self.assertAllEqual(cells, nearest)


class SoftEncodingTest(tf.test.TestCase, parameterized.TestCase):

  def _brute_force(self, ab, k, sigma):
    bins = ab_bins.ab_bins().astype(np.float64)
    d2 = np.sum((ab[:, None, :].astype(np.float64) - bins[None]) ** 2, axis=-1)
    order = np.argsort(d2, axis=1, kind='stable')[:, :k]
    near = np.take_along_axis(d2, order, axis=1)
    weights = np.exp(-near / (2 * sigma ** 2))
    return order, weights / weights.sum(axis=1, keepdims=True)

  @parameterized.parameters(1, 5, 10)
  def test_weights_sum_to_one_over_k_nearest_bins(self, k):
    ab = _reachable_ab(3000)[::150]
    n = len(ab)
    indices, weights = ab_bins.soft_encode(ab, num_neighbors=k)
    self.assertEqual(indices.shape, (n, k))
    self.assertEqual(indices.dtype, tf.int32)
    self.assertAllClose(tf.reduce_sum(weights, -1), np.ones(n), atol=1e-6)
    self.assertTrue(all(len(set(row)) == k for row in indices.numpy()))
    self.assertTrue(np.all(np.diff(weights.numpy(), axis=1) <= 1e-7))
    want_indices, want_weights = self._brute_force(ab, k, 5.0)
    # Same bin sets (ties between equidistant bins may be ordered differently).
    self.assertAllEqual(np.sort(indices.numpy(), 1), np.sort(want_indices, 1))
    self.assertAllClose(weights, want_weights, atol=1e-5)
    self.assertAllEqual(indices[:, 0], ab_bins.nearest_bin(ab))

  def test_gaussian_sigma(self):
    # Target on a bin centre in the interior: the 4 axis neighbours are 10
    # away, so each gets exp(-100 / 50) of the centre's weight.
    _, weights = ab_bins.soft_encode([[0.0, 0.0]], num_neighbors=5, sigma=5.0)
    self.assertAllClose(weights[0, 1:] / weights[0, 0], [np.exp(-2.0)] * 4)

  def test_batched_and_inside_tf_data(self):
    ab = _reachable_ab(1024)[:1024].reshape(4, 16, 16, 2)
    eager = ab_bins.soft_encode(ab, 5)
    ds = tf.data.Dataset.from_tensor_slices(ab).map(
        lambda x: ab_bins.soft_encode(x, 5), num_parallel_calls=2,
        deterministic=True)
    got = list(ds.as_numpy_iterator())
    self.assertAllEqual(np.stack([g[0] for g in got]), eager[0])
    self.assertAllClose(np.stack([g[1] for g in got]), eager[1])

  def test_bad_k(self):
    with self.assertRaisesRegex(ValueError, 'num_neighbors'):
      ab_bins.soft_encode([[0.0, 0.0]], num_neighbors=0)

  @parameterized.parameters((5, 0.75), (10, 0.5))
  def test_encoding_decodes_back_to_the_colour(self, k, bound):
    ab = _reachable_ab(10_000, surface_step=5)
    decoded = _in_chunks(
        lambda x: ab_bins.decode_soft_encoding(*ab_bins.soft_encode(x, k)).numpy(),
        ab)
    error = np.linalg.norm(decoded - ab, axis=-1)
    # Measured max |decoded - ab| over all surface colours and 100 K random
    # ones: 0.709 (k=5) and 0.418 (k=10) ab units; the nearest bin alone is up
    # to 5 * sqrt(2) = 7.07 away.
    self.assertLess(error.max(), bound)
    nearest = ab_bins.ab_bins()[_in_chunks(ab_bins.nearest_bin, ab)]
    self.assertLessEqual(np.linalg.norm(nearest - ab, axis=-1).max(),
                         HALF_DIAGONAL + 1e-4)
    # The dense form carries the same distribution.
    dense = ab_bins.dense_encoding(*ab_bins.soft_encode(ab[:10], k))
    self.assertAllClose(tf.reduce_sum(dense, -1), np.ones(10), atol=1e-6)
    self.assertAllClose(dense @ ab_bins.ab_bins(), decoded[:10], atol=1e-4)


class AnnealedMeanTest(tf.test.TestCase):

  def test_temperatures(self):
    logits = np.random.default_rng(0).normal(0, 2, [7, 313]).astype(np.float32)
    bins = ab_bins.ab_bins()
    probs = tf.nn.softmax(logits).numpy()
    self.assertAllClose(ab_bins.annealed_mean(logits, 1.0), probs @ bins,
                        atol=1e-3)
    self.assertAllClose(ab_bins.annealed_mean(logits, 1e-3),
                        bins[np.argmax(logits, -1)], atol=1e-3)
    sharpened = tf.nn.softmax(logits / 0.38).numpy() @ bins
    self.assertAllClose(ab_bins.annealed_mean(logits), sharpened, atol=1e-3)
    with self.assertRaisesRegex(ValueError, 'temperature'):
      ab_bins.annealed_mean(logits, 0.0)


class RebalancingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(0.5, 0.2, 1.0)
  def test_expectation_one_and_lambda_form(self, lam):
    rng = np.random.default_rng(1)
    prior = rng.dirichlet(np.full(313, 0.3))
    prior[:20] = 0.0
    prior /= prior.sum()
    w = ab_bins.rebalancing_weights(prior, lam)
    self.assertAllClose(np.sum(prior * w), 1.0, atol=1e-12)
    mix = (1 - lam) * prior + lam / 313
    # w is inversely proportional to the mixture: w * mix is one constant.
    self.assertAllClose(w * mix, np.full(313, w[0] * mix[0]), rtol=1e-10)
    self.assertLessEqual(w.max(), 313 / lam * np.sum(prior * w) + 1e-6)
    if lam == 1.0:
      self.assertAllClose(w, np.ones(313))

  def test_uniform_prior_gives_unit_weights(self):
    self.assertAllClose(ab_bins.rebalancing_weights(np.full(313, 1 / 313)),
                        np.ones(313))

  def test_bad_lambda(self):
    with self.assertRaisesRegex(ValueError, 'rebalance_lambda'):
      ab_bins.rebalancing_weights(np.full(313, 1 / 313), 0.0)

  def test_smoothing_is_a_gaussian_of_sigma_5(self):
    counts = np.zeros(313)
    centre = int(np.flatnonzero((ab_bins.ab_bins() == [0, 0]).all(1))[0])
    counts[centre] = 1000
    smooth = ab_bins.smooth_histogram(counts)
    self.assertAllClose(smooth.sum(), 1.0)
    bins = ab_bins.ab_bins()
    for offset, ratio in (([10, 0], np.exp(-2)), ([10, 10], np.exp(-4)),
                          ([0, 20], np.exp(-8))):
      j = int(np.flatnonzero((bins == offset).all(1))[0])
      self.assertAllClose(smooth[j] / smooth[centre], ratio)
    with self.assertRaisesRegex(ValueError, 'not all zero'):
      ab_bins.smooth_histogram(np.zeros(313))


class PriorFileTest(tf.test.TestCase):

  def test_round_trip(self):
    path = os.path.join(self.get_temp_dir(), 'p', 'prior.npy')
    prior = np.random.default_rng(2).dirichlet(np.ones(313))
    ab_bins.save_prior(path, prior, {'source': 'x'})
    self.assertAllClose(ab_bins.load_prior(path), prior)
    self.assertEqual(ab_bins.read_prior_metadata(path), {'source': 'x'})
    self.assertEqual([f for f in os.listdir(os.path.dirname(path))
                      if f.startswith('.')], [])  # no temporary files left

  def test_errors_name_the_file_and_the_problem(self):
    tmp = self.get_temp_dir()

    def write(name, data):
      path = os.path.join(tmp, name)
      with open(path, 'wb') as f:
        f.write(data)
      return path

    def npy(name, array, **kwargs):
      path = os.path.join(tmp, name)
      np.save(path, array, **kwargs)
      return path

    good = np.full(313, 1 / 313)
    bad_nan = good.copy()
    bad_nan[3] = np.nan
    bad_negative = good.copy()
    bad_negative[0] = -0.5
    cases = [
        (os.path.join(tmp, 'missing.npy'), 'does not exist'),
        (write('text.npy', b'not an array'), 'not a readable .npy'),
        (write('empty.npy', b''), 'not a readable .npy'),
        (npy('shape.npy', np.full(312, 1 / 312)), r'shape \(313,\).*\(312,\)'),
        (npy('ints.npy', np.ones(313, np.int64)), 'dtype int64'),
        (npy('nan.npy', bad_nan), 'NaN'),
        (npy('negative.npy', bad_negative), 'negative'),
        (npy('sum.npy', good * 2), 'sum to 2'),
        (npy('object.npy', np.array([None] * 313, object), allow_pickle=True),
         'not a readable .npy'),
    ]
    for path, problem in cases:
      with self.assertRaisesRegex(ab_bins.ColorPriorError,
                                  f"'{path}'.*{problem}", msg=path):
        ab_bins.load_prior(path)


if __name__ == '__main__':
  tf.test.main()
