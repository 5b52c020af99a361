"""Assembles an evaluation run from its configuration tree.

`make_evaluation(config)` (a `mtssl.configs.evaluation.EvaluationConfig`)
checks every setting, the trunk specification and the data (TFDS prepared,
split present, class counts consistent) BEFORE anything is built or trained,
and raises `ValueError` subclasses with one clear message;
`Evaluation.run()` then builds the trunk (loading the checkpoint), trains and
evaluates. The protocol is looked up in `registry`; nothing here names one.
"""

import dataclasses
from typing import Dict

from mtssl.configs import evaluation as evaluation_config
from mtssl.evaluation import data as data_lib
from mtssl.evaluation import label_checks
from mtssl.evaluation import registry
from mtssl.evaluation import runner
from mtssl.evaluation import trunks

ConfigError = evaluation_config.ConfigError


@dataclasses.dataclass
class Evaluation:
  """A checked, ready-to-run evaluation."""
  protocol_class: type
  config: evaluation_config.EvaluationConfig
  run_config: runner.RunConfig
  trunk_spec: trunks.TrunkSpec
  protocol_config: object
  train_source: data_lib.LabeledSource
  eval_source: data_lib.LabeledSource

  @property
  def protocol_name(self) -> str:
    return self.protocol_class.name

  def make_protocol(self, trunk) -> runner.Protocol:
    return self.protocol_class(self.protocol_config, trunk, self.train_source,
                               self.eval_source)

  def run(self) -> Dict[str, object]:
    provider = trunks.make_trunk_provider(self.trunk_spec)
    trunk = provider.build()
    protocol = self.make_protocol(trunk)
    return runner.run(protocol, self.run_config, provider.describe())


def _protocol_config(protocol_class, config):
  """The protocol's settings, checked; an automatic batch norm resolved."""
  settings = config.protocol_config
  if not isinstance(settings, protocol_class.config_class):
    raise ConfigError(f'The {protocol_class.name} protocol takes a '
                      f'{protocol_class.config_class.__name__}, got '
                      f'{type(settings).__name__}.')
  settings = dataclasses.replace(settings)
  if getattr(settings, 'batch_norm', '') is None:
    # A random trunk has no statistics to freeze.
    settings.batch_norm = ('frozen' if config.trunk.init_checkpoint
                           else 'train')
  settings.validate()
  return settings


def make_evaluation(
    config: evaluation_config.EvaluationConfig) -> Evaluation:
  """Checks everything and returns the runnable evaluation (see module doc)."""
  protocol_class = registry.get_protocol(config.protocol)
  if not config.run.model_dir:
    raise ConfigError('--model_dir is required: where checkpoints, '
                      'TensorBoard summaries and the metrics JSON are '
                      'written.')
  run_config = dataclasses.replace(
      config.run, name=config.run.name or trunks.describe_checkpoint(
          config.trunk.init_checkpoint))
  run_config.validate()

  trunk_spec = trunks.TrunkSpec(
      name=config.trunk.trunk, output_stride=config.trunk.output_stride,
      init_checkpoint=config.trunk.init_checkpoint or None,
      seed=run_config.seed)
  trunks.validate_trunk_spec(trunk_spec)

  settings = _protocol_config(protocol_class, config)
  inputs = config.inputs
  inputs.validate()
  synthetic_size = (inputs.synthetic_size
                    or protocol_class.synthetic_size(settings))
  synthetic_options = dict(
      height=synthetic_size[0], width=synthetic_size[1],
      num_classes=inputs.synthetic_classes,
      max_objects=inputs.synthetic_max_objects,
      eval_examples=inputs.synthetic_eval_examples,
      train_examples=inputs.synthetic_train_examples)
  kind = protocol_class.data_kind
  train_source = data_lib.make_labeled_source(
      kind, inputs.data, 'train', inputs.tfds_data_dir, **synthetic_options)
  eval_spec = inputs.eval_data or data_lib.eval_spec_for(inputs.data)
  if eval_spec is None:
    raise ConfigError(f'--data={inputs.data} has no built-in evaluation '
                      f'split; give --eval_data (e.g. folder:/path/val).')
  eval_source = data_lib.make_labeled_source(
      kind, eval_spec, 'eval', inputs.tfds_data_dir, **synthetic_options)
  train_source.validate()
  eval_source.validate()
  if hasattr(settings, 'num_classes'):
    label_checks.check_num_classes((train_source, eval_source),
                                   settings.num_classes, '--num_classes')
  return Evaluation(protocol_class, config, run_config, trunk_spec, settings,
                    train_source, eval_source)
