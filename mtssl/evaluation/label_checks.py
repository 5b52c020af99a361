"""Checks on the labels an evaluation reads: class ranges inside the input
pipeline (a value outside stops it with a message naming the example), the
message of such a stop, and each source's declared class count.

Typical use:

    label = assert_class_range(example['label'], num_classes, example['index'])
"""

from typing import Sequence

import tensorflow as tf

from mtssl.evaluation import data as data_lib


def assert_class_range(classes: tf.Tensor, num_classes: int,
                       index: tf.Tensor, what: str = 'label') -> tf.Tensor:
  """Returns `classes` after checking each is in [0, num_classes).

  A value outside stops the input pipeline with an InvalidArgumentError whose
  message names the example and the value (see `data_error_message`).
  """
  classes = tf.convert_to_tensor(classes)
  flat = tf.reshape(classes, [-1])
  valid = (flat >= 0) & (flat < num_classes)
  first_bad = tf.gather(tf.concat([flat, [0]], 0),
                        tf.argmin(tf.concat([tf.cast(valid, tf.int32), [0]],
                                            0)))
  message = tf.strings.format(
      what + ' {} of example {} is outside the class range [0, '
      + str(num_classes) + ')', (first_bad, index))
  check = tf.debugging.Assert(tf.reduce_all(valid), [message])
  with tf.control_dependencies([check]):
    return tf.identity(classes)


_MARK = 'assertion failed: ['


def data_error_message(error: tf.errors.OpError) -> str:
  """The first line of an input-pipeline error, our assertion text unwrapped."""
  text = getattr(error, 'message', None) or str(error)
  if _MARK in text:
    line = text[text.index(_MARK) + len(_MARK):].splitlines()[0]
    return line[:-1] if line.endswith(']') else line
  return text.strip().splitlines()[0]


def check_num_classes(sources: Sequence[data_lib.LabeledSource],
                      num_classes: int, what: str = 'num_classes') -> None:
  """Raises DataSourceError if a source declares more than num_classes."""
  for source in sources:
    n = source.num_classes
    if n is not None and num_classes is not None and n > num_classes:
      raise data_lib.DataSourceError(f'{source.name} has {n} classes but '
                                     f'{what} is {num_classes}.')
