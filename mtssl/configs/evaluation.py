"""Evaluation configuration as code: one dataclass tree per protocol.

`EvaluationConfig` = `run` (RunConfig), `trunk` (TrunkConfig), `inputs`
(DataConfig) and the protocol's own config; `default_config(protocol)` is
its paper-scale run. Field names are unique in a tree, so fields and flags
use bare names.

Typical use:

    config = make_config('linear', train_steps=10, image_size=56)
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

from absl import flags

from mtssl.configs import base
from mtssl.configs.base import ConfigError
from mtssl.data import synthetic
from mtssl.evaluation import registry

OPTIMIZERS = ('momentum', 'rmsprop', 'adam')


def square(size, name):
  """(S,) -> (S, S); checks a (height, width) pair."""
  if size is None:
    return None
  size = tuple(size)
  if len(size) == 1:
    size = size * 2
  if len(size) != 2:
    raise ConfigError(f'{name}: give S or H,W, got '
                      f'{",".join(str(s) for s in size)}.')
  return size


@dataclasses.dataclass
class RunConfig:
  """What every protocol's run shares."""
  model_dir: str = base.field(
      '', 'output directory: checkpoints, TensorBoard summaries (train/, '
      'eval/) and <protocol>_metrics.json; a run there is resumed. Required')
  train_steps: int = base.field(1000, 'training steps')
  batch_size: int = base.field(32, 'training batch size')
  eval_batch_size: int = base.field(32, 'evaluation batch size')
  optimizer: str = base.field(
      'momentum', 'momentum (SGD with --momentum), rmsprop (TF1 RMSProp) or '
      'adam', choices=OPTIMIZERS)
  learning_rate: float = base.field(0.01, 'initial learning rate')
  momentum: float = base.field(0.9, 'momentum of --optimizer=momentum')
  lr_decay_steps: int = base.field(
      0, 'multiply the learning rate by --lr_decay_rate every this many steps '
      '(staircase; 0: constant)')
  lr_decay_rate: float = base.field(0.1, 'staircase decay factor')
  seed: int = base.field(0, 'seed of initialisation, data order and '
                         'augmentation')
  log_every: int = base.field(100, 'steps between training summaries')
  eval_every: int = base.field(0, 'steps between evaluations during training '
                               '(0: at the end only)')
  checkpoint_every: int = base.field(1000, 'steps between checkpoints')
  max_nonfinite: int = base.field(20, 'stop after this many training steps in '
                                  'a row with a non-finite loss or gradient')
  name: Optional[str] = base.field(None, 'row label in the printed table row '
                                   '(None: the checkpoint, or "Random init")')

  def validate(self):
    problems = []
    if not self.model_dir:
      problems.append('model_dir is required')
    for name in ('train_steps', 'batch_size', 'eval_batch_size', 'log_every',
                 'checkpoint_every', 'max_nonfinite'):
      if getattr(self, name) <= 0:
        problems.append(f'{name} must be positive, got {getattr(self, name)}')
    for name in ('eval_every', 'lr_decay_steps'):
      if getattr(self, name) < 0:
        problems.append(f'{name} must be >= 0, got {getattr(self, name)}')
    if self.optimizer not in OPTIMIZERS:
      problems.append(f'optimizer must be one of {OPTIMIZERS}, got '
                      f'{self.optimizer!r}')
    if not self.learning_rate > 0:
      problems.append(f'learning_rate must be positive, got '
                      f'{self.learning_rate}')
    if not 0 <= self.seed < 2**31:
      problems.append(f'seed must be in [0, 2**31), got {self.seed}')
    if problems:
      raise ValueError('; '.join(problems) + '.')


@dataclasses.dataclass
class TrunkConfig:
  """The trunk under evaluation."""
  trunk: str = base.field('resnet_v2_101', 'trunk preset '
                          '(mtssl.backbones.resnet_v2.TRUNK_BLOCKS)')
  output_stride: int = base.field(16, 'trunk output stride')
  init_checkpoint: Optional[str] = base.field(
      None, 'trunk weights: a converted or trainer checkpoint (`backbone` '
      'key), a TF-Slim ResNet-v2 checkpoint (prefix or directory), or a '
      'SavedModel version directory written by `python -m mtssl.export`; '
      'None or empty: random initialisation')


@dataclasses.dataclass
class DataConfig:
  """Training and evaluation data."""
  data: str = base.field('synthetic', 'training data: synthetic, '
                         'folder:/path (linear), tfds:NAME[:SPLIT]')
  eval_data: Optional[str] = base.field(
      None, 'evaluation data (None: the held-out split that goes with --data)')
  tfds_data_dir: Optional[str] = base.field(None, 'TFDS data directory')
  synthetic_size: Optional[Tuple[int, int]] = base.field(
      None, 'synthetic scene size S or H,W (None: what the protocol crops or '
      'resizes from)')
  synthetic_train_examples: int = base.field(
      0, 'synthetic training set size (0: a new scene at every position)')
  synthetic_eval_examples: int = base.field(500, 'synthetic evaluation set '
                                            'size')
  synthetic_classes: int = base.field(synthetic.NUM_CLASSES,
                                      'synthetic object classes')
  synthetic_max_objects: int = base.field(8, 'synthetic objects per scene at '
                                          'most')

  def __post_init__(self):
    self.synthetic_size = square(self.synthetic_size, 'synthetic_size')

  def validate(self):
    for name in ('synthetic_eval_examples', 'synthetic_classes',
                 'synthetic_max_objects'):
      if getattr(self, name) < 1:
        raise ConfigError(f'{name} must be positive, got '
                          f'{getattr(self, name)}.')
    if self.synthetic_train_examples < 0:
      raise ConfigError(f'synthetic_train_examples must be >= 0, got '
                        f'{self.synthetic_train_examples}.')
    if self.synthetic_size is not None and min(self.synthetic_size) < 1:
      raise ConfigError(f'synthetic_size must be positive, got '
                        f'{self.synthetic_size}.')


@dataclasses.dataclass
class EvaluationConfig:
  """A whole evaluation run of one protocol."""
  protocol: str
  protocol_config: Any
  run: RunConfig = dataclasses.field(default_factory=RunConfig)
  trunk: TrunkConfig = dataclasses.field(default_factory=TrunkConfig)
  inputs: DataConfig = dataclasses.field(default_factory=DataConfig)


# The sub-configs of EvaluationConfig, in flag-definition order.
GROUPS = ('run', 'trunk', 'inputs', 'protocol_config')


def default_config(protocol: str) -> EvaluationConfig:
  """The paper-scale run of `protocol` (a registered protocol's name)."""
  cls = registry.get_protocol(protocol)
  return EvaluationConfig(
      protocol=protocol, protocol_config=cls.config_class(),
      run=RunConfig(**cls.run_defaults),
      trunk=TrunkConfig(**cls.trunk_defaults))


def _owners(config: EvaluationConfig) -> Dict[str, str]:
  """Field name -> the group that holds it (names are unique)."""
  owners = {}
  for group in GROUPS:
    for f in dataclasses.fields(getattr(config, group)):
      if f.name in owners:
        raise ConfigError(f'{config.protocol}: field {f.name!r} is in both '
                          f'{owners[f.name]} and {group}.')
      owners[f.name] = group
  return owners


def with_values(config: EvaluationConfig, **values) -> EvaluationConfig:
  """`config` with fields set by bare name (train_steps=..., image_size=...)."""
  owners = _owners(config)
  by_group: Dict[str, Dict[str, Any]] = {}
  for name, value in values.items():
    if name not in owners:
      raise ConfigError(f'{config.protocol}: no setting {name!r}.')
    by_group.setdefault(owners[name], {})[name] = value
  return dataclasses.replace(config, **{
      group: dataclasses.replace(getattr(config, group), **updates)
      for group, updates in by_group.items()})


def make_config(protocol: str, **values) -> EvaluationConfig:
  """`default_config(protocol)` with the given fields set."""
  return with_values(default_config(protocol), **values)


def define_flags(protocol: str, flag_values=flags.FLAGS) -> None:
  """--<field> for every settable field of `protocol`'s tree; each flag's
  help ends with the protocol's default."""
  defaults = default_config(protocol)
  _owners(defaults)
  for group in GROUPS:
    sub = getattr(defaults, group)
    base.define_flags(type(sub), defaults=sub, flag_values=flag_values)


def from_flags(protocol: str, flag_values=flags.FLAGS) -> EvaluationConfig:
  """`default_config(protocol)` with every given flag applied."""
  config = default_config(protocol)
  return dataclasses.replace(config, **{
      group: base.apply_flags(getattr(config, group), flag_values)
      for group in GROUPS})
