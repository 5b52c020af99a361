"""The training / evaluation loop every protocol shares (`Protocol`, `run`).

A protocol supplies datasets, model, losses and a metric accumulator;
`run()` trains with finite-guarded steps, checkpoints and resumes,
writes TensorBoard summaries and `<model_dir>/<protocol>_metrics.json`.
Choices: BUILD.md, "Runner".
"""

import abc
import dataclasses
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.configs import evaluation as evaluation_config
from mtssl.utils import io_utils
from mtssl.training import optimizers as optimizers_lib
from mtssl.evaluation import data as data_lib
from mtssl.evaluation import label_checks
from mtssl.training import core


class EvaluationError(ValueError):
  """Bad input met by an evaluation run; the message names the problem."""


# The settings every protocol's run shares (flags --train_steps, ...).
RunConfig = evaluation_config.RunConfig
OPTIMIZERS = evaluation_config.OPTIMIZERS


def learning_rate_schedule(config: RunConfig):
  if not config.lr_decay_steps:
    return config.learning_rate
  return tf_keras.optimizers.schedules.ExponentialDecay(
      config.learning_rate, config.lr_decay_steps, config.lr_decay_rate,
      staircase=True)


def make_optimizer(config: RunConfig):
  lr = learning_rate_schedule(config)
  if config.optimizer == 'momentum':
    return tf_keras.optimizers.legacy.SGD(lr, momentum=config.momentum)
  if config.optimizer == 'rmsprop':
    return optimizers_lib.TF1RMSProp(lr)
  return tf_keras.optimizers.legacy.Adam(lr)


class Protocol(abc.ABC):
  """One evaluation protocol: data, model, loss, metrics, table row.

  Subclasses are built from (config dataclass with `validate()`, trunk,
  training source, evaluation source) and add their model and metrics.
  """

  name: str = ''  # set by registry.register_protocol
  # The protocol's settings dataclass (fields with help: they become flags).
  config_class: type = None
  # The kind of labeled data it needs (mtssl.evaluation.data.KINDS).
  data_kind: str = ''
  # Paper-scale values of RunConfig / TrunkConfig fields for this protocol.
  run_defaults: Dict[str, Any] = {}
  trunk_defaults: Dict[str, Any] = {}
  # The paper's table columns this protocol fills, for the report.
  paper_columns: str = ''
  # Key of the headline metric in the metrics dict.
  headline: str = ''
  # The header of the paper's table that table_row() fills.
  table_header: str = ''

  def __init__(self, config, trunk, train_source: data_lib.LabeledSource,
               eval_source: data_lib.LabeledSource):
    self.config = config
    self.trunk = trunk
    self.train_source = train_source
    self.eval_source = eval_source

  @classmethod
  def synthetic_size(cls, config) -> Tuple[int, int]:
    """Size of the built-in scenes the protocol's inputs are made from."""
    size = config.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

  @property
  def sources(self):
    return (self.train_source, self.eval_source)

  def validate(self) -> None:
    """Checks settings and data; raises DataSourceError / ValueError."""
    self.config.validate()
    for source in self.sources:
      if source.kind != self.data_kind:
        raise data_lib.DataSourceError(
            f'{source.name} is a {source.kind} dataset; the {self.name} '
            f'protocol needs {self.data_kind} data.')
      source.validate()

  def resolve_num_classes(self) -> int:
    """config.num_classes, defaulting to the training data's; checked."""
    if self.config.num_classes is None:
      self.config.num_classes = self.train_source.num_classes
    label_checks.check_num_classes(self.sources, self.config.num_classes)
    return self.config.num_classes

  def lasso_layer(self):
    """The evaluation task's UnitLasso, once built, or None."""
    return None

  def batched_train(self, example_fn, seed: int, start: int,
                    batch_size: int) -> tf.data.Dataset:
    """The training stream mapped by example_fn, in full batches."""
    ds = self.train_source.train(seed, start).map(
        example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)

  def batched_eval(self, example_fn, batch_size: int) -> tf.data.Dataset:
    """The evaluation split mapped by example_fn, batched (last partial)."""
    ds = self.eval_source.eval().map(
        example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(2)

  @abc.abstractmethod
  def train_dataset(self, seed: int, start: int,
                    batch_size: int) -> tf.data.Dataset:
    """Batched training features (dicts with 'index'), from position start."""

  @abc.abstractmethod
  def eval_dataset(self, batch_size: int) -> tf.data.Dataset:
    """Batched, finite evaluation features."""

  @abc.abstractmethod
  def build(self, batch: Dict[str, tf.Tensor]) -> None:
    """Creates every variable (runs the model once on `batch`)."""

  @property
  @abc.abstractmethod
  def checkpoint_items(self) -> Dict[str, Any]:
    """Objects whose variables a resumable checkpoint holds."""

  @abc.abstractmethod
  def trainable_variables(self) -> List[tf.Variable]:
    """What the optimizer updates."""

  def moving_statistics(self) -> List[tf.Variable]:
    """Batch-norm moving statistics of the checkpointed modules (a dropped
    non-finite step puts them back)."""
    seen, out = set(), []
    modules = [m for m in self.checkpoint_items.values()
               if isinstance(m, tf.Module)]
    for v in core.moving_statistics(*modules):
      if v.ref() not in seen:
        seen.add(v.ref())
        out.append(v)
    return out

  @abc.abstractmethod
  def losses(self, batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Training-mode losses; 'total' is the objective (with regularization)."""

  @abc.abstractmethod
  def predict(self, batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Inference-mode outputs for the accumulator."""

  @abc.abstractmethod
  def new_accumulator(self):
    """A fresh metric accumulator."""

  @abc.abstractmethod
  def accumulate(self, accumulator, batch: Dict[str, np.ndarray],
                 outputs: Dict[str, np.ndarray]) -> None:
    """Adds one evaluated batch to the accumulator."""

  def chance(self) -> Dict[str, object]:
    """The metrics of a trivial predictor (chance level), for comparison."""
    return {}

  @abc.abstractmethod
  def table_row(self, label: str, metrics: Dict[str, object]) -> str:
    """The metrics as a row of the paper's table(s)."""

  def describe(self) -> Dict[str, object]:
    """The protocol's settings, data and learned lasso weights, for reports."""
    out = dataclasses.asdict(self.config)
    out['train_data'] = data_lib.describe(self.train_source)
    out['eval_data'] = data_lib.describe(self.eval_source)
    lasso = self.lasso_layer()
    if lasso is not None:
      out['lasso_alpha'] = np.asarray(lasso.alpha).tolist()
    return out

  def data_problems(self) -> Dict[str, Dict[str, int]]:
    """Skipped / converted examples of the train and eval data, by reason.

    Keyed by role: the two sources may be the same folder (same name).
    """
    return {'train': self.train_source.counter.problems(),
            'eval': self.eval_source.counter.problems()}


def _next_batch(iterator):
  try:
    return next(iterator)
  except tf.errors.InvalidArgumentError as e:
    raise EvaluationError(label_checks.data_error_message(e)) from None


def evaluate(protocol: Protocol, batch_size: int,
             predict_fn=None) -> Dict[str, object]:
  """Runs the protocol's evaluation split through the model; metrics dict."""
  predict_fn = predict_fn or tf.function(
      protocol.predict, reduce_retracing=True, autograph=False)
  accumulator = protocol.new_accumulator()
  iterator = iter(protocol.eval_dataset(batch_size))
  while True:
    try:
      batch = _next_batch(iterator)
    except StopIteration:
      break
    outputs = predict_fn(batch)
    protocol.accumulate(
        accumulator, tf.nest.map_structure(lambda t: t.numpy(), batch),
        tf.nest.map_structure(lambda t: t.numpy(), outputs))
  return accumulator.result()


def _scalar_metrics(metrics, prefix=''):
  for key, value in metrics.items():
    if isinstance(value, dict):
      yield from _scalar_metrics(value, f'{prefix}{key}/')
    elif isinstance(value, (int, float, np.floating, np.integer)):
      yield f'{prefix}{key}', float(value)


class _TrainStep:
  """The compiled, finite-guarded update of a protocol's variables."""

  def __init__(self, protocol: Protocol, optimizer):
    self.protocol = protocol
    self.update = core.GuardedUpdate(optimizer, protocol.trainable_variables(),
                                     protocol.moving_statistics())
    self.fn = tf.function(self._step, reduce_retracing=True, autograph=False)

  def _step(self, batch):
    result = self.update.gradients(lambda: self.protocol.losses(batch))
    return result['losses'], self.update.apply(result)


def run(protocol: Protocol, config: RunConfig,
        trunk_description: Optional[Dict[str, object]] = None
        ) -> Dict[str, object]:
  """Trains and evaluates; returns (and writes) the report dict."""
  config.validate()
  protocol.validate()
  os.makedirs(config.model_dir, exist_ok=True)
  tf_keras.utils.set_random_seed(config.seed)

  step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
  position = tf.Variable(0, dtype=tf.int64, trainable=False, name='position')
  start_iterator = iter(protocol.train_dataset(config.seed, 0,
                                               config.batch_size))
  protocol.build(_next_batch(start_iterator))
  del start_iterator
  optimizer = make_optimizer(config)
  train_step = _TrainStep(protocol, optimizer)
  checkpoint = tf.train.Checkpoint(optimizer=optimizer, step=step_var,
                                   position=position,
                                   **protocol.checkpoint_items)
  manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(config.model_dir, 'checkpoints'),
      max_to_keep=2)
  if manager.latest_checkpoint:
    try:
      checkpoint.restore(
          manager.latest_checkpoint).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      raise EvaluationError(
          f'{config.model_dir} holds checkpoint {manager.latest_checkpoint} '
          f'of another run ({str(e).splitlines()[0][:300]}); give a new '
          f'--model_dir.') from None
    logging.info('Resumed from %s at step %d.', manager.latest_checkpoint,
                 int(step_var))

  train_writer = tf.summary.create_file_writer(
      os.path.join(config.model_dir, 'train'))
  eval_writer = tf.summary.create_file_writer(
      os.path.join(config.model_dir, 'eval'))
  predict_fn = tf.function(protocol.predict, reduce_retracing=True,
                           autograph=False)

  iterator = iter(protocol.train_dataset(config.seed, int(position),
                                         config.batch_size))
  sums: Dict[str, float] = {}
  logged_steps = 0
  nonfinite_in_row = 0
  skipped_steps = 0
  tick = time.time()
  examples = 0
  step = int(step_var)
  history = []
  while step < config.train_steps:
    batch = _next_batch(iterator)
    losses, applied = train_step.fn(batch)
    if bool(applied):
      nonfinite_in_row = 0
      for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      logged_steps += 1
    else:
      nonfinite_in_row += 1
      skipped_steps += 1
      if nonfinite_in_row >= config.max_nonfinite:
        raise EvaluationError(
            f'{config.max_nonfinite} training steps in a row had a non-finite '
            f'loss or gradient (last at step {step}); lower the learning '
            f'rate.')
    examples += int(batch['index'].shape[0])
    position.assign(int(np.max(batch['index'].numpy())) + 1)
    step += 1
    step_var.assign(step)
    if step % config.log_every == 0 or step == config.train_steps:
      elapsed = max(time.time() - tick, 1e-9)
      with train_writer.as_default(step=step):
        for k, v in sums.items():
          tf.summary.scalar(f'loss/{k}', v / max(logged_steps, 1))
        lr = optimizer._decayed_lr(tf.float32)  # pylint: disable=protected-access
        tf.summary.scalar('learning_rate', lr)
        tf.summary.scalar('examples_per_second', examples / elapsed)
        tf.summary.scalar('skipped_nonfinite_steps', skipped_steps)
      mean_total = sums.get('total', math.nan) / max(logged_steps, 1)
      history.append({'step': step, 'total_loss': mean_total})
      logging.info('%s step %d/%d: loss %.4f, %.1f examples/s', protocol.name,
                   step, config.train_steps, mean_total, examples / elapsed)
      sums, logged_steps, examples, tick = {}, 0, 0, time.time()
    if config.eval_every and step % config.eval_every == 0 and (
        step < config.train_steps):
      metrics = evaluate(protocol, config.eval_batch_size, predict_fn)
      with eval_writer.as_default(step=step):
        for k, v in _scalar_metrics(metrics):
          tf.summary.scalar(k, v)
      logging.info('%s step %d: %s = %.3f', protocol.name, step,
                   protocol.headline, metrics[protocol.headline])
    if step % config.checkpoint_every == 0:
      manager.save(checkpoint_number=step)
  if manager.latest_checkpoint is None or int(
      manager.latest_checkpoint.rsplit('-', 1)[-1]) != step:
    manager.save(checkpoint_number=step)

  metrics = evaluate(protocol, config.eval_batch_size, predict_fn)
  chance = protocol.chance()
  label = config.name or 'Random init'
  row = protocol.table_row(label, metrics)
  with eval_writer.as_default(step=step):
    for k, v in _scalar_metrics(metrics):
      tf.summary.scalar(k, v)
    for k, v in _scalar_metrics(chance, 'chance/'):
      tf.summary.scalar(k, v)
    tf.summary.text('paper_table_row', row)
  train_writer.flush()
  eval_writer.flush()
  report = {
      'protocol': protocol.name,
      'paper_columns': protocol.paper_columns,
      'headline': protocol.headline,
      'metrics': metrics,
      'chance': chance,
      'table_row': row,
      'label': label,
      'steps': step,
      'skipped_nonfinite_steps': skipped_steps,
      'loss_history': history,
      'trunk': trunk_description or {},
      'run_config': dataclasses.asdict(config),
      'protocol_config': protocol.describe(),
      'data_problems': protocol.data_problems(),
  }
  io_utils.atomic_write_json(
      os.path.join(config.model_dir, f'{protocol.name}_metrics.json'),
      _jsonable(report))
  return report


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value
