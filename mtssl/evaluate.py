r"""Evaluates a pre-trained trunk the three ways of the paper (section 5).

  python -m mtssl.evaluate linear    --init_checkpoint=CKPT --model_dir=DIR \
      --data=tfds:imagenet2012
  python -m mtssl.evaluate depth     --init_checkpoint=CKPT --model_dir=DIR \
      --data=tfds:nyu_depth_v2
  python -m mtssl.evaluate detection --init_checkpoint=CKPT --model_dir=DIR \
      --data=tfds:voc/2007

Without --init_checkpoint the trunk is randomly initialised (the paper's
random-init baseline); without --data the built-in synthetic scenes are used.
The run writes checkpoints, TensorBoard summaries (`DIR/train`, `DIR/eval`)
and `DIR/<protocol>_metrics.json`, and prints the row of the paper's table
that the metrics fill. Exit status 2: a flag, the checkpoint or the data is
unusable; the message says which and why.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from mtssl import evaluation

# TensorFlow is imported only once the flags are known to be usable (main),
# so that a usage error is reported at once.

_PROTOCOL_HELP = ', '.join(evaluation.PROTOCOLS)

flags.DEFINE_string('model_dir', None, 'Output directory (checkpoints, '
                    'TensorBoard summaries, metrics JSON). Required.')
flags.DEFINE_string('init_checkpoint', None,
                    'Trunk weights: a converted or trainer checkpoint '
                    '(`backbone` key), a TF-Slim ResNet-v2 checkpoint (prefix '
                    'or directory), or a SavedModel version directory written '
                    'by `python -m mtssl.export`. Empty: random '
                    'initialisation.')
flags.DEFINE_string('trunk', 'resnet_v2_101', 'Trunk preset '
                    '(mtssl.backbones.resnet_v2.TRUNK_BLOCKS).')
flags.DEFINE_integer('output_stride', None, 'Trunk output stride (default: '
                     'linear 8, depth 16, detection 16).')
flags.DEFINE_string('data', 'synthetic', 'Training data: synthetic, '
                    'folder:/path (linear), tfds:NAME[:SPLIT].')
flags.DEFINE_string('eval_data', None, 'Evaluation data (default: the '
                    'held-out split that goes with --data).')
flags.DEFINE_string('tfds_data_dir', None, 'TFDS data directory.')
flags.DEFINE_string('name', None, 'Row label in the printed table row '
                    '(default: the checkpoint, or "Random init").')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, data order and '
                     'augmentation.')
flags.DEFINE_integer('train_steps', None, 'Training steps.')
flags.DEFINE_integer('batch_size', None, 'Training batch size.')
flags.DEFINE_integer('eval_batch_size', None, 'Evaluation batch size.')
flags.DEFINE_enum('optimizer', None, ['momentum', 'rmsprop', 'adam'],
                  'Optimizer (momentum: SGD with momentum 0.9; rmsprop: '
                  'TF1 RMSProp).')
flags.DEFINE_float('learning_rate', None, 'Initial learning rate.')
flags.DEFINE_integer('lr_decay_steps', None, 'Multiply the learning rate by '
                     '--lr_decay_rate every this many steps (0: constant).')
flags.DEFINE_float('lr_decay_rate', None, 'Staircase decay factor.')
flags.DEFINE_integer('log_every', 100, 'Steps between training summaries.')
flags.DEFINE_integer('eval_every', 0, 'Steps between evaluations during '
                     'training (0: at the end only).')
flags.DEFINE_integer('checkpoint_every', 1000, 'Steps between checkpoints.')
flags.DEFINE_float('lasso_l1', None, 'Feed the protocol a lasso combination '
                   'of all block-3 units with this L1 weight (the paper\'s '
                   '"eval only lasso"); unset: the block-3 output.')
flags.DEFINE_float('weight_decay', None, 'L2 weight decay (Slim form) of the '
                   'trained layers.')
flags.DEFINE_enum('batch_norm', None, ['train', 'frozen'], 'Batch norm of '
                  'the fine-tuned trunk (default: depth train; detection '
                  'frozen for a pre-trained trunk, train for a random one).')
flags.DEFINE_float('head_batch_norm_decay', None, 'depth, detection: '
                   'moving-average decay of the new heads\' batch norms '
                   '(default 0.99).')
flags.DEFINE_list('image_size', None, 'Input size: S or H,W (default: linear '
                  '224, depth 240,320, detection 1024).')
flags.DEFINE_integer('resize_size', None, 'linear: shorter side before the '
                     'crop (default 256).')
flags.DEFINE_integer('num_classes', None, 'Classes (default: the data\'s).')
flags.DEFINE_list('upproj_filters', None, 'depth: up-projection filters '
                  '(default 512,256,128).')
flags.DEFINE_float('min_depth', None, 'depth: lower clip of predictions.')
flags.DEFINE_float('max_depth', None, 'depth: upper clip of predictions.')
flags.DEFINE_integer('short_side', None, 'detection: shorter side (600).')
flags.DEFINE_float('scale_min', None, 'detection: multi-scale factor low.')
flags.DEFINE_float('scale_max', None, 'detection: multi-scale factor high.')
flags.DEFINE_list('anchor_sizes', None, 'detection: anchor sizes in pixels.')
flags.DEFINE_list('aspect_ratios', None, 'detection: anchor aspect ratios.')
flags.DEFINE_integer('rpn_filters', None, 'detection: RPN conv filters.')
flags.DEFINE_integer('num_proposals', None, 'detection: proposals kept.')
flags.DEFINE_integer('num_sampled_rois', None, 'detection: ROIs per image.')
flags.DEFINE_integer('crop_size', None, 'detection: ROIAlign size (14).')
flags.DEFINE_integer('block4_base_depth', None, 'detection: block-4 base '
                     'depth (default twice block 3\'s).')
flags.DEFINE_string('block4_checkpoint', None, 'detection: TF-Slim '
                    'ResNet-v2 checkpoint to initialise block 4 from.')
flags.DEFINE_integer('max_detections', None, 'detection: per image.')
flags.DEFINE_integer('max_instances', None, 'detection: boxes per training '
                     'image.')
flags.DEFINE_list('synthetic_size', None, 'Synthetic scene size H,W.')
flags.DEFINE_integer('synthetic_train_examples', 0, 'Synthetic training set '
                     'size (0: a new scene at every position).')
flags.DEFINE_integer('synthetic_eval_examples', 500, 'Synthetic evaluation '
                     'set size.')
flags.DEFINE_integer('synthetic_classes', 10, 'Synthetic object classes.')
flags.DEFINE_integer('synthetic_max_objects', 8, 'Synthetic objects per '
                     'scene at most.')

FLAGS = flags.FLAGS

TABLE_HEADERS = {
    'linear': '| Pre-training | ImageNet top1 | ImageNet top5 |',
    'depth': ('| Pre-training | Pct. < 1.25 | Pct. < 1.25^2 | Pct. < 1.25^3 '
              '| Mean Absolute Error | Mean Relative Error |'),
    'detection': '| Pre-training | PASCAL mAP@0.5 | PASCAL mAP@0.75 |',
}


class UsageError(ValueError):
  pass


def _ints(name, values, count=None):
  if values is None:
    return None
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    raise UsageError(f'--{name}={",".join(values)}: expected integers.') from None
  if count == 'size':
    if len(out) == 1:
      out = out * 2
    if len(out) != 2:
      raise UsageError(f'--{name}: give S or H,W, got {",".join(values)}.')
  return out


def _floats(name, values):
  if values is None:
    return None
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise UsageError(f'--{name}={",".join(values)}: expected numbers.') from None


def _options_from_flags(factory):
  batch_norm = FLAGS.batch_norm
  return factory.EvaluationOptions(
      model_dir=FLAGS.model_dir or '',
      init_checkpoint=FLAGS.init_checkpoint or None,
      trunk=FLAGS.trunk, output_stride=FLAGS.output_stride,
      data=FLAGS.data, eval_data=FLAGS.eval_data,
      tfds_data_dir=FLAGS.tfds_data_dir, name=FLAGS.name, seed=FLAGS.seed,
      train_steps=FLAGS.train_steps, batch_size=FLAGS.batch_size,
      eval_batch_size=FLAGS.eval_batch_size, optimizer=FLAGS.optimizer,
      learning_rate=FLAGS.learning_rate, lr_decay_steps=FLAGS.lr_decay_steps,
      lr_decay_rate=FLAGS.lr_decay_rate, log_every=FLAGS.log_every,
      eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every,
      lasso_l1=FLAGS.lasso_l1, weight_decay=FLAGS.weight_decay,
      train_batch_norm=None if batch_norm is None else batch_norm == 'train',
      head_batch_norm_decay=FLAGS.head_batch_norm_decay,
      image_size=_ints('image_size', FLAGS.image_size, 'size'),
      resize_size=FLAGS.resize_size, num_classes=FLAGS.num_classes,
      upproj_filters=_ints('upproj_filters', FLAGS.upproj_filters),
      min_depth=FLAGS.min_depth, max_depth=FLAGS.max_depth,
      short_side=FLAGS.short_side, scale_min=FLAGS.scale_min,
      scale_max=FLAGS.scale_max,
      anchor_sizes=_floats('anchor_sizes', FLAGS.anchor_sizes),
      aspect_ratios=_floats('aspect_ratios', FLAGS.aspect_ratios),
      rpn_filters=FLAGS.rpn_filters, num_proposals=FLAGS.num_proposals,
      num_sampled_rois=FLAGS.num_sampled_rois, crop_size=FLAGS.crop_size,
      block4_base_depth=FLAGS.block4_base_depth,
      block4_checkpoint=FLAGS.block4_checkpoint,
      max_detections=FLAGS.max_detections, max_instances=FLAGS.max_instances,
      synthetic_size=_ints('synthetic_size', FLAGS.synthetic_size, 'size'),
      synthetic_train_examples=FLAGS.synthetic_train_examples,
      synthetic_eval_examples=FLAGS.synthetic_eval_examples,
      synthetic_classes=FLAGS.synthetic_classes,
      synthetic_max_objects=FLAGS.synthetic_max_objects)


def _fail(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


def main(argv):
  if len(argv) != 2 or argv[1] not in evaluation.PROTOCOLS:
    given = ' '.join(argv[1:]) or 'nothing'
    return _fail(f'give exactly one protocol ({_PROTOCOL_HELP}); got {given}. '
                 f'Usage: python -m mtssl.evaluate PROTOCOL --model_dir=DIR '
                 f'[--init_checkpoint=CKPT] [--data=...]')
  protocol = argv[1]
  # pylint: disable=g-import-not-at-top
  from mtssl.evaluation import data as data_lib
  from mtssl.evaluation import factory
  from mtssl.evaluation import runner
  from mtssl.evaluation import trunks
  # pylint: enable=g-import-not-at-top
  try:
    run = factory.make_evaluation(protocol, _options_from_flags(factory))
  except ValueError as e:  # every check of flags, trunk and data
    return _fail(str(e))
  try:
    report = run.run()
  except (trunks.TrunkLoadError, data_lib.DataSourceError,
          runner.EvaluationError) as e:
    return _fail(str(e))
  logging.info('Metrics: %s', report['metrics'])
  print(f'{protocol}: fills {report["paper_columns"]}')
  print(TABLE_HEADERS[protocol])
  print(report['table_row'])
  print(f'headline {report["headline"]} = {report["metrics"][report["headline"]]:.2f}'
        f' (chance {report["chance"].get(report["headline"], float("nan")):.2f})')
  print(f'Wrote {run.run_config.model_dir}/{protocol}_metrics.json')
  return 0


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def entry_point():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  entry_point()
