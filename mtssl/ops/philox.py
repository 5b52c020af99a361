"""TensorFlow's stateless uniform draws on any device, in integer graph ops.

`tf.random.stateless_uniform` runs Philox-4x32-10 (Salmon et al., 2011) on
the CPU, but XLA lowers the same op to another generator: a compiled step
gets other numbers for the same seed. `uniform` computes the CPU kernel's
numbers from the key and counter that `key_counter` takes from a seed on the
host, with 32-bit integer arithmetic only, so the compiled step gets them
bit for bit.

Typical use:

    key, counter = philox.key_counter(seed)            # in the input pipeline
    noise = philox.uniform([96, 96, 3], key, counter)  # anywhere
    # == tf.random.stateless_uniform([96, 96, 3], seed) on the CPU
"""

import tensorflow as tf

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)
_ROUNDS = 10
_LOW = 0xFFFFFFFF


def key_counter(seed):
  """(key uint64 [1], counter uint64 [2]) of an int [2] seed: what
  `tf.random.stateless_uniform` derives from it on the CPU."""
  with tf.device('/cpu:0'):
    return tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)


def _words(x):
  """uint64 [..., n] -> uint32 [..., 2n], low word first."""
  low = tf.cast(tf.bitwise.bitwise_and(x, tf.constant(_LOW, tf.uint64)),
                tf.uint32)
  high = tf.cast(tf.bitwise.right_shift(x, tf.constant(32, tf.uint64)),
                 tf.uint32)
  return tf.reshape(tf.stack([low, high], axis=-1),
                    tf.concat([tf.shape(x)[:-1], [-1]], 0))


def _mul_hi_lo(a, m: int):
  """(high, low) 32-bit words of the 64-bit product of uint32 `a` and `m`."""
  product = tf.cast(a, tf.uint64) * tf.constant(m, tf.uint64)
  return (tf.cast(tf.bitwise.right_shift(product, tf.constant(32, tf.uint64)),
                  tf.uint32),
          tf.cast(tf.bitwise.bitwise_and(product, tf.constant(_LOW, tf.uint64)),
                  tf.uint32))


def _add_small(counter, n):
  """The 128-bit counter (4 uint32 words, low first) plus uint64 `n` < 2^32."""
  out, carry = [], n
  for word in counter:
    total = tf.cast(word, tf.uint64) + carry
    out.append(tf.cast(tf.bitwise.bitwise_and(
        total, tf.constant(_LOW, tf.uint64)), tf.uint32))
    carry = tf.bitwise.right_shift(total, tf.constant(32, tf.uint64))
  return out


def _philox(counter, key):
  """Philox-4x32-10 of counter words c0..c3 under key words k0, k1."""
  c0, c1, c2, c3 = counter
  k0, k1 = key
  for i in range(_ROUNDS):
    hi0, lo0 = _mul_hi_lo(c0, _M0)
    hi1, lo1 = _mul_hi_lo(c2, _M1)
    c0, c1, c2, c3 = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    if i + 1 < _ROUNDS:
      k0 = k0 + tf.constant(_W0, tf.uint32)
      k1 = k1 + tf.constant(_W1, tf.uint32)
  return c0, c1, c2, c3


def uniform(shape, key, counter, minval=0.0, maxval=1.0):
  """float32 uniform draws in [minval, maxval) of `shape` for every
  (key, counter) pair: key uint64 [..., 1], counter uint64 [..., 2] (the
  leading axes ... are kept in front of `shape`).

  The values of `tf.random.stateless_uniform(shape, seed, minval, maxval)`
  on the CPU, where (key, counter) = key_counter(seed). Draw i is word
  i % 4 of Philox at counter + i // 4; its low 23 bits are the mantissa of a
  float in [1, 2), minus 1.
  """
  shape = [int(d) for d in shape]
  size = 1
  for d in shape:
    size *= d
  groups = -(-size // 4)
  lead = tf.shape(key)[:-1]
  key = tf.reshape(_words(key), [-1, 1, 2])
  counter = tf.reshape(_words(counter), [-1, 1, 4])
  steps = tf.cast(tf.range(groups, dtype=tf.int64), tf.uint64)[tf.newaxis]
  words = _philox(_add_small(tf.unstack(counter, axis=-1), steps),
                  tf.unstack(key, axis=-1))
  bits = tf.reshape(tf.stack(words, axis=-1), [-1, 4 * groups])[:, :size]
  mantissa = tf.bitwise.bitwise_or(
      tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFF, tf.uint32)),
      tf.constant(127 << 23, tf.uint32))
  unit = tf.bitcast(mantissa, tf.float32) - 1.0
  minval = tf.constant(minval, tf.float32)
  values = unit * (tf.constant(maxval, tf.float32) - minval) + minval
  return tf.reshape(values, tf.concat([lead, shape], 0))
