"""Counting skipped and converted examples with graph ops only.

A `SkipCounter` counts from inside tf.data through `tf.numpy_function`, which
a tf.data service worker cannot run. A `ProblemCounter` instead carries the
counts with the data: every element holds an int64 vector of counts by
reason (`PROBLEMS_KEY` in its features), the events of the elements dropped
before it included, and the consumer adds the vectors of the batches it takes
(`take_counts`). Reasons are numbered when the pipeline is traced, in the
consumer's process, so the numbering travels with the dataset graph.

Used by graph-only sources (mtssl.data.image_records) and by the tasks'
pipelines through `map_examples` / `filter_counted`, which fall back to the
`SkipCounter` path for every other source.
"""

import threading
from typing import Callable, Dict

import numpy as np
import tensorflow as tf

from mtssl.data import sources

PROBLEMS_KEY = 'data_problems'
MAX_REASONS = 32

_collecting = threading.local()


class ProblemCounter(sources.SkipCounter):
  """A SkipCounter whose in-graph counts travel with the elements."""

  graph_only = True

  def __init__(self, name: str = ''):
    super().__init__(name)
    # Decode statuses keep their codes (sources.OK ... sources.TRUNCATED).
    self.reasons = [sources.STATUS_NAMES[c] for c in sorted(sources.STATUS_NAMES)]

  def code(self, reason: str) -> int:
    if reason not in self.reasons:
      if len(self.reasons) >= MAX_REASONS:
        raise ValueError(f'{self.name}: more than {MAX_REASONS} count reasons.')
      self.reasons.append(reason)
    return self.reasons.index(reason)

  def one_hot(self, reason) -> tf.Tensor:
    """int64 [MAX_REASONS] counting one `reason` (a name, or a code tensor)."""
    code = self.code(reason) if isinstance(reason, str) else reason
    return tf.one_hot(code, MAX_REASONS, dtype=tf.int64)

  def zeros(self) -> tf.Tensor:
    return tf.zeros([MAX_REASONS], tf.int64)

  def note(self, condition, reason, value):
    """Inside `map_examples`: counted with the element; elsewhere as SkipCounter."""
    stack = getattr(_collecting, 'stack', None)
    if not stack:
      return super().note(condition, reason, value)
    stack[-1].append((reason, condition))
    return value

  def add_vector(self, counts) -> None:
    """Adds a counts vector (or a batch of them) to the totals."""
    counts = np.asarray(counts, np.int64).reshape(-1, MAX_REASONS).sum(axis=0)
    for code in np.flatnonzero(counts):
      self.add(self.reasons[code], int(counts[code]))


def take_counts(features: Dict[str, tf.Tensor], counter) -> None:
  """Removes the counts a batch carries and adds them to `counter`."""
  counts = features.pop(PROBLEMS_KEY, None)
  if counts is not None:
    counter.add_vector(counts.numpy() if hasattr(counts, 'numpy') else counts)


def is_graph_only(source) -> bool:
  return getattr(source.counter, 'graph_only', False) and (
      hasattr(source, 'counted_images') or hasattr(source, 'counted_examples'))


def _kept(element, keep):
  """Of the (element, keep) pairs a counting scan yields: the flag."""
  del element
  return keep


def _element(element, keep):
  """Of the (element, keep) pairs a counting scan yields: the element."""
  del keep
  return element


def _stop_after_limit(counter, streak, counts, reason: str = '',
                      shown=None):
  """`counts`, once `streak` (skips in a row) is below `counter.limit`; else
  an error that `sources.raise_if_stalled` turns into the source's
  DataSourceError, with the counts `shown` (default `counts`)."""
  if not counter.limit:
    return counts
  why = f'{reason}; {counter.limit_reason}' if reason else counter.limit_reason

  def _message():
    return tf.strings.join([
        f'{sources.STALLED_MARKER}{counter.name}: {counter.limit} elements in '
        f'a row skipped ({why}); counts so far: ',
        _describe(counter, counts if shown is None else shown),
        '. The source yields no usable data.'])

  ok = streak < counter.limit
  with tf.control_dependencies([tf.debugging.Assert(ok, [tf.cond(
      ok, lambda: tf.constant(''), _message)])]):
    return tf.identity(counts)


def _describe(counter, counts) -> tf.Tensor:
  """'reason n, ...' of a counts vector (the reasons known when traced)."""
  names = counter.reasons + [f'reason_{i}' for i in
                             range(len(counter.reasons), MAX_REASONS)]
  parts = tf.strings.join([tf.constant(names), tf.strings.as_string(counts)],
                          ' ')
  return tf.strings.reduce_join(tf.boolean_mask(parts, counts > 0),
                                separator=', ')


def carry_counts(ds: tf.data.Dataset, counter, skipped) -> tf.data.Dataset:
  """(index, *payload, status code) elements -> (index, *payload, counts) of
  the kept ones: an element whose status is in `skipped` is dropped and its
  count carried to the next kept element, with that element's own status.
  `counter.limit` skips in a row stop the stream with an error that
  `sources.raise_if_stalled` turns into the source's DataSourceError."""
  def _carry(state, element):
    pending, streak = state
    counts = pending + counter.one_hot(element[-1])
    ok = tf.reduce_all(tf.not_equal(tf.cast(element[-1], tf.int64),
                                    tf.constant(skipped, tf.int64)))
    streak = tf.where(ok, tf.constant(0, tf.int64), streak + 1)
    counts = _stop_after_limit(counter, streak, counts)
    return ((tf.where(ok, counter.zeros(), counts), streak),
            (element[:-1] + (counts,), ok))

  return ds.scan((counter.zeros(), tf.constant(0, tf.int64)), _carry).filter(
      _kept).map(_element)


def counted_stream(source, seed: int, start: int, element: Callable,
                   cycle_length: int = 16,
                   skipped=sources.SKIPPED) -> tf.data.Dataset:
  """Endless (index, *payload, counts) of a graph-only source from `start`:
  `element(i)` is a dataset of one (*payload, status) for item i of the
  source's `epoch_size()` items, visited in an order reshuffled per epoch;
  statuses in `skipped` are dropped and counted (`carry_counts`)."""
  n = source.epoch_size()

  def _at(k):
    i = sources.epoch_permutation_index(k, n, seed)
    return element(i).map(lambda *payload: (k,) + payload)

  ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max).interleave(
      _at, cycle_length=cycle_length, block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return carry_counts(ds, source.counter, skipped)


def count_with(counter, ds: tf.data.Dataset) -> tf.data.Dataset:
  """(index, *payload, counts) -> (index, *payload), the counts added to
  `counter` through numpy_function (consumers in the counter's process)."""

  def _add(c):
    counter.add_vector(c)
    return np.int32(0)

  def _take(*element):
    done = tf.numpy_function(_add, [element[-1]], tf.int32, stateful=True)
    with tf.control_dependencies([done]):
      return tuple(tf.identity(t) for t in element[:-1])

  return ds.map(_take)


def map_examples(source, seed: int, start: int, fn: Callable,
                 **map_kwargs) -> tf.data.Dataset:
  """`source.images(seed, start).map(fn)`, carrying counts on graph sources.

  `fn(index, image)` returns (features, labels, ...) or features; on a
  graph-only source features gain PROBLEMS_KEY: the source's counts plus the
  `counter.note` events of `fn`.
  """
  fn = tf.autograph.experimental.do_not_convert(fn)
  if not is_graph_only(source):
    return source.images(seed, start).map(fn, **map_kwargs)
  counter = source.counter

  @tf.autograph.experimental.do_not_convert
  def _fn(index, image, counts):
    notes = []
    stack = getattr(_collecting, 'stack', None)
    if stack is None:
      stack = _collecting.stack = []
    stack.append(notes)
    try:
      out = fn(index, image)
    finally:
      stack.pop()
    for reason, condition in notes:
      counts += tf.cast(condition, tf.int64) * counter.one_hot(reason)
    if isinstance(out, dict):  # features alone (ex)
      return dict(out, **{PROBLEMS_KEY: counts})
    features = dict(out[0])
    features[PROBLEMS_KEY] = counts
    return (features,) + tuple(out[1:])

  return source.counted_images(seed, start).map(_fn, **map_kwargs)


def filter_counted(ds: tf.data.Dataset, counter, predicate: Callable,
                   reason: str) -> tf.data.Dataset:
  """`ds.filter(predicate)`, counting each dropped element as `reason`.

  Elements are (features, ...). With a ProblemCounter (and features carrying
  PROBLEMS_KEY) the counts of dropped elements move to the next kept one.
  """
  if not (getattr(counter, 'graph_only', False)
          and PROBLEMS_KEY in ds.element_spec[0]):
    return ds.filter(lambda *e: counter.keep(predicate(*e), reason))
  dropped = counter.one_hot(reason)

  def _step(state, element):
    pending, streak = state
    keep = predicate(*element)
    features = dict(element[0])
    counts = features[PROBLEMS_KEY] + pending
    streak = tf.where(keep, tf.constant(0, tf.int64), streak + 1)
    pending = tf.where(keep, tf.zeros_like(counts), counts + dropped)
    features[PROBLEMS_KEY] = _stop_after_limit(counter, streak, counts, reason,
                                               shown=pending)
    return (pending, streak), ((features,) + tuple(element[1:]), keep)

  return ds.scan((counter.zeros(), tf.constant(0, tf.int64)), _step).filter(
      _kept).map(_element)


def count_in_process(ds: tf.data.Dataset, counter) -> tf.data.Dataset:
  """Batches without PROBLEMS_KEY, whose counts go to `counter` through
  numpy_function: for pipelines that run in the counter's own process and
  whose consumer does not call `take_counts` (the cluster workers)."""
  if PROBLEMS_KEY not in ds.element_spec[0]:
    return ds

  def _add(counts):
    counter.add_vector(counts)
    return np.int32(0)

  def _take(features, *rest):
    features = dict(features)
    counts = features.pop(PROBLEMS_KEY)
    done = tf.numpy_function(_add, [counts], tf.int32, stateful=True)
    with tf.control_dependencies([done]):
      features = tf.nest.map_structure(tf.identity, features)
    return (features,) + rest

  return ds.map(_take)
