"""Assembles an evaluation run from plain options (what the CLI flags hold).

`make_evaluation(protocol, options)` checks every option, the trunk
specification and the data (TFDS prepared, split present, class counts
consistent) BEFORE anything is built or trained, and raises `ValueError`
subclasses with one clear message; `Evaluation.run()` then builds the trunk
(loading the checkpoint), trains and evaluates.

Options left at None take the protocol's default (`PROTOCOL_DEFAULTS`): the
paper-scale setting, e.g. ResNet-101 at 224x224 for the linear protocol.
"""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

from mtssl import evaluation
from mtssl.data import synthetic
from mtssl.evaluation import data as data_lib
from mtssl.evaluation import runner
from mtssl.evaluation import trunks

PROTOCOLS = evaluation.PROTOCOLS
KIND = {'linear': 'classification', 'depth': 'depth', 'detection': 'detection'}

# Paper-scale defaults per protocol. Where the paper gives no number these
# are this implementation's choices (BUILD.md, section evaluation).
PROTOCOL_DEFAULTS = {
    'linear': dict(output_stride=8, image_size=(224, 224), resize_size=256,
                   train_steps=150000, batch_size=256, eval_batch_size=250,
                   optimizer='momentum', learning_rate=0.01,
                   lr_decay_steps=50000, lr_decay_rate=0.1, weight_decay=0.0,
                   train_batch_norm=False),
    'depth': dict(output_stride=16, image_size=(240, 320), resize_size=None,
                  train_steps=80000, batch_size=16, eval_batch_size=8,
                  optimizer='rmsprop', learning_rate=1e-4,
                  lr_decay_steps=0, lr_decay_rate=0.1, weight_decay=1e-4,
                  train_batch_norm=True),
    'detection': dict(output_stride=16, image_size=(1024, 1024),
                      resize_size=None, train_steps=100000, batch_size=2,
                      eval_batch_size=4, optimizer='rmsprop',
                      learning_rate=1e-4, lr_decay_steps=80000,
                      lr_decay_rate=0.1, weight_decay=1e-4,
                      # None: frozen for a pre-trained trunk, trained for a
                      # random one (which has no statistics to freeze).
                      train_batch_norm=None),
}


@dataclasses.dataclass
class EvaluationOptions:
  """Every setting of an evaluation run; None = the protocol default."""
  model_dir: str = ''
  init_checkpoint: Optional[str] = None
  trunk: str = 'resnet_v2_101'
  output_stride: Optional[int] = None
  data: str = 'synthetic'
  eval_data: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  name: Optional[str] = None
  seed: int = 0
  # Run.
  train_steps: Optional[int] = None
  batch_size: Optional[int] = None
  eval_batch_size: Optional[int] = None
  optimizer: Optional[str] = None
  learning_rate: Optional[float] = None
  lr_decay_steps: Optional[int] = None
  lr_decay_rate: Optional[float] = None
  log_every: int = 100
  eval_every: int = 0
  checkpoint_every: int = 1000
  # Model.
  lasso_l1: Optional[float] = None
  weight_decay: Optional[float] = None
  train_batch_norm: Optional[bool] = None
  head_batch_norm_decay: Optional[float] = None
  image_size: Optional[Tuple[int, int]] = None
  resize_size: Optional[int] = None
  num_classes: Optional[int] = None
  # Depth.
  upproj_filters: Optional[Sequence[int]] = None
  min_depth: Optional[float] = None
  max_depth: Optional[float] = None
  # Detection.
  short_side: Optional[int] = None
  scale_min: Optional[float] = None
  scale_max: Optional[float] = None
  anchor_sizes: Optional[Sequence[float]] = None
  aspect_ratios: Optional[Sequence[float]] = None
  rpn_filters: Optional[int] = None
  num_proposals: Optional[int] = None
  num_sampled_rois: Optional[int] = None
  crop_size: Optional[int] = None
  block4_base_depth: Optional[int] = None
  block4_checkpoint: Optional[str] = None
  max_detections: Optional[int] = None
  max_instances: Optional[int] = None
  # Built-in synthetic data.
  synthetic_size: Optional[Tuple[int, int]] = None
  synthetic_train_examples: int = 0
  synthetic_eval_examples: int = 500
  synthetic_classes: int = synthetic.NUM_CLASSES
  synthetic_max_objects: int = 8


def _pick(value, default):
  return default if value is None else value


def _overrides(options: EvaluationOptions, names) -> Dict[str, object]:
  return {n: getattr(options, n) for n in names
          if getattr(options, n) is not None}


@dataclasses.dataclass
class Evaluation:
  """A checked, ready-to-run evaluation."""
  protocol_name: str
  options: EvaluationOptions
  run_config: runner.RunConfig
  trunk_spec: trunks.TrunkSpec
  protocol_config: object
  train_source: data_lib.LabeledSource
  eval_source: data_lib.LabeledSource

  def make_protocol(self, trunk):
    if self.protocol_name == 'linear':
      from mtssl.evaluation import linear  # pylint: disable=g-import-not-at-top
      cls = linear.LinearProtocol
    elif self.protocol_name == 'depth':
      from mtssl.evaluation import depth  # pylint: disable=g-import-not-at-top
      cls = depth.DepthProtocol
    else:
      from mtssl.evaluation import detection  # pylint: disable=g-import-not-at-top
      cls = detection.DetectionProtocol
    return cls(self.protocol_config, trunk, self.train_source,
               self.eval_source)

  def run(self) -> Dict[str, object]:
    provider = trunks.make_trunk_provider(self.trunk_spec)
    trunk = provider.build()
    protocol = self.make_protocol(trunk)
    return runner.run(protocol, self.run_config, provider.describe())


def _protocol_config(name, options, defaults, image_size, lasso_l1,
                     weight_decay, train_batch_norm):
  """The protocol's own config dataclass, checked."""
  if name == 'linear':
    from mtssl.evaluation import linear  # pylint: disable=g-import-not-at-top
    if image_size[0] != image_size[1]:
      raise ValueError(f'The linear protocol crops square images; '
                       f'image_size {image_size} is not square.')
    config = linear.LinearConfig(
        num_classes=options.num_classes, image_size=image_size[0],
        resize_size=_pick(options.resize_size, defaults['resize_size']),
        lasso_l1=lasso_l1, weight_decay=weight_decay)
  elif name == 'depth':
    from mtssl.evaluation import depth  # pylint: disable=g-import-not-at-top
    config = depth.DepthConfig(
        image_size=tuple(image_size), lasso_l1=lasso_l1,
        weight_decay=weight_decay, train_batch_norm=train_batch_norm,
        **_overrides(options, ('min_depth', 'max_depth',
                               'head_batch_norm_decay')))
    if options.upproj_filters is not None:
      config.upproj_filters = tuple(int(f) for f in options.upproj_filters)
  else:
    from mtssl.evaluation import detection  # pylint: disable=g-import-not-at-top
    if image_size[0] != image_size[1]:
      raise ValueError(f'The detection canvas is square; image_size '
                       f'{image_size} is not.')
    config = detection.DetectionConfig(
        num_classes=options.num_classes, image_size=image_size[0],
        lasso_l1=lasso_l1, weight_decay=weight_decay,
        train_batch_norm=train_batch_norm,
        **_overrides(options, (
            'short_side', 'scale_min', 'scale_max', 'rpn_filters',
            'num_proposals', 'num_sampled_rois', 'crop_size',
            'block4_base_depth', 'block4_checkpoint', 'max_detections',
            'max_instances', 'head_batch_norm_decay')))
    if options.anchor_sizes is not None:
      config.anchor_sizes = tuple(float(a) for a in options.anchor_sizes)
    if options.aspect_ratios is not None:
      config.aspect_ratios = tuple(float(a) for a in options.aspect_ratios)
  config.validate()
  return config


def make_evaluation(protocol: str, options: EvaluationOptions) -> Evaluation:
  """Checks everything and returns the runnable evaluation (see module doc)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'Unknown protocol {protocol!r}; choose one of '
                     f'{", ".join(PROTOCOLS)}.')
  defaults = PROTOCOL_DEFAULTS[protocol]
  if not options.model_dir:
    raise ValueError('--model_dir is required: where checkpoints, TensorBoard '
                     'summaries and the metrics JSON are written.')
  run_config = runner.RunConfig(
      model_dir=options.model_dir,
      train_steps=_pick(options.train_steps, defaults['train_steps']),
      batch_size=_pick(options.batch_size, defaults['batch_size']),
      eval_batch_size=_pick(options.eval_batch_size,
                            defaults['eval_batch_size']),
      optimizer=_pick(options.optimizer, defaults['optimizer']),
      learning_rate=_pick(options.learning_rate, defaults['learning_rate']),
      lr_decay_steps=_pick(options.lr_decay_steps, defaults['lr_decay_steps']),
      lr_decay_rate=_pick(options.lr_decay_rate, defaults['lr_decay_rate']),
      seed=options.seed, log_every=options.log_every,
      eval_every=options.eval_every,
      checkpoint_every=options.checkpoint_every,
      label=options.name or trunks.describe_checkpoint(
          options.init_checkpoint))
  run_config.validate()

  trunk_spec = trunks.TrunkSpec(
      name=options.trunk,
      output_stride=_pick(options.output_stride, defaults['output_stride']),
      init_checkpoint=options.init_checkpoint or None, seed=options.seed)
  trunks.validate_trunk_spec(trunk_spec)

  image_size = tuple(_pick(options.image_size, defaults['image_size']))
  if len(image_size) != 2:
    raise ValueError(f'image_size must be one size or height,width; got '
                     f'{image_size}.')
  train_batch_norm = _pick(options.train_batch_norm,
                           defaults['train_batch_norm'])
  if train_batch_norm is None:
    train_batch_norm = not trunk_spec.init_checkpoint
  config = _protocol_config(
      protocol, options, defaults, image_size, options.lasso_l1,
      _pick(options.weight_decay, defaults['weight_decay']),
      train_batch_norm)

  kind = KIND[protocol]
  if options.synthetic_size is not None:
    synthetic_size = tuple(options.synthetic_size)
  elif protocol == 'linear':
    synthetic_size = (config.resize_size, config.resize_size)
  else:
    synthetic_size = image_size
  synthetic_options = dict(
      height=synthetic_size[0], width=synthetic_size[1],
      num_classes=options.synthetic_classes,
      max_objects=options.synthetic_max_objects,
      eval_examples=options.synthetic_eval_examples,
      train_examples=options.synthetic_train_examples)
  train_source = data_lib.make_labeled_source(
      kind, options.data, 'train', options.tfds_data_dir, **synthetic_options)
  eval_spec = options.eval_data or data_lib.eval_spec_for(options.data)
  if eval_spec is None:
    raise ValueError(f'--data={options.data} has no built-in evaluation '
                     f'split; give --eval_data (e.g. folder:/path/val).')
  eval_source = data_lib.make_labeled_source(
      kind, eval_spec, 'eval', options.tfds_data_dir, **synthetic_options)
  train_source.validate()
  eval_source.validate()
  if protocol in ('linear', 'detection'):
    data_lib.check_num_classes((train_source, eval_source),
                               options.num_classes, '--num_classes')
  return Evaluation(protocol, options, run_config, trunk_spec, config,
                    train_source, eval_source)
