"""The coordinator's queue of work closures and their reports."""

import queue
import threading
import time

import tensorflow as tf
from absl import logging

class Closures:
  """Schedules work closures and collects their reports.

  Each report is fetched by a daemon thread, so that a closure that never
  runs (queued for a worker that never comes back) cannot keep the
  coordinator from exiting.
  """

  def __init__(self, coordinator, fn, args):
    self._coordinator = coordinator
    self._fn = fn
    self._args = args
    self._reports = queue.Queue()
    self._traced = False
    self.outstanding = 0
    self.lost_reports = 0

  def fill(self, target):
    while self.outstanding < target:
      t0 = time.time()
      remote = self._coordinator.schedule(self._fn, args=self._args)
      if not self._traced:
        self._traced = True
        logging.info('Traced the work function in %.1f s.', time.time() - t0)
      threading.Thread(target=self._fetch, args=(remote,), daemon=True,
                       name='mtssl-fetch').start()
      self.outstanding += 1

  def _fetch(self, remote):
    try:
      self._reports.put((remote.fetch(), None))
    except tf.errors.UnavailableError as e:
      if _lost_worker_result(e):
        # The closure ran, but its worker went away before its report was
        # copied back. Its gradient row is on the ps; only the report is
        # lost, which the round bookkeeping allows for (`_contributed`).
        self._reports.put((None, LOST_REPORT))
      else:
        self._reports.put((None, e))
    except Exception as e:  # pylint: disable=broad-except
      self._reports.put((None, e))

  def next(self, timeout):
    """The next report, None after `timeout` s or for a lost report;
    re-raises a closure's error."""
    try:
      report, error = self._reports.get(timeout=timeout)
    except queue.Empty:
      return None
    self.outstanding -= 1
    if error is LOST_REPORT:
      self.lost_reports += 1
      logging.warning('A work report was lost with its worker (%d so far); '
                      'the worker\'s next closure reports its state.',
                      self.lost_reports)
      return None
    if error is not None:
      raise error
    return report


LOST_REPORT = object()


def _lost_worker_result(error: tf.errors.UnavailableError) -> bool:
  """Whether `error` is a worker's result that could not be copied back.

  ClusterCoordinator re-runs a closure whose worker fails while it runs, but
  a result already computed lives on the worker until it is fetched; a
  worker lost in between makes the fetch fail with an UnavailableError that
  names the worker as the remote target. A lost ps is not this case.
  """
  text = str(error)
  return '/job:worker/' in text and '/job:ps/' not in text
