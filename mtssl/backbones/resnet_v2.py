"""TF-Slim ResNet-v2 (pre-activation, bottleneck) in tf_keras, identical to Slim's.

The architecture is data: a list of `Block`s and one planning function,
`plan_units`, that owns output stride and atrous rate. Calling the model
returns its end points under their Slim names. Slim conventions and parity:
BUILD.md, "Trunk".

Typical use:

    trunk = paper_trunk(output_stride=8)   # resnet_v2_101 up to block 3
    features = trunk(images)['resnet_v2_101/block3']  # 256x256 -> 32x32x1024
"""

import collections
import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import tensorflow as tf
import tf_keras

from mtssl.backbones import slim_layers

ROOT_STRIDE = 4  # conv1 stride 2 followed by pool1 stride 2.


@dataclasses.dataclass(frozen=True)
class Block:
  """A ResNet-v2 block: `num_units` bottleneck units, stride on the last one."""
  scope: str
  base_depth: int
  num_units: int
  stride: int

  def __post_init__(self):
    if self.base_depth <= 0 or self.num_units <= 0 or self.stride <= 0:
      raise ValueError(f'Block {self.scope!r}: base_depth, num_units and '
                       f'stride must be positive, got {self}.')


@dataclasses.dataclass(frozen=True)
class UnitPlan:
  """One bottleneck unit as it actually runs (after output-stride planning)."""
  block: str
  index: int  # 1-based, as in Slim's `unit_%d`.
  depth: int
  depth_bottleneck: int
  stride: int
  rate: int

  @property
  def scope(self) -> str:
    return f'{self.block}/unit_{self.index}/bottleneck_v2'


_DEPTH_BLOCKS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


def resnet_v2_blocks(depth: int, num_blocks: int = 4) -> List[Block]:
  """The Slim block list of resnet_v2_<depth>, cut after `num_blocks` blocks."""
  if depth not in _DEPTH_BLOCKS:
    raise ValueError(f'Unsupported ResNet-v2 depth {depth}; '
                     f'choose one of {sorted(_DEPTH_BLOCKS)}.')
  if not 1 <= num_blocks <= 4:
    raise ValueError(f'num_blocks must be in 1..4, got {num_blocks}.')
  units = _DEPTH_BLOCKS[depth]
  blocks = [
      Block('block1', 64, units[0], 2),
      Block('block2', 128, units[1], 2),
      Block('block3', 256, units[2], 2),
      Block('block4', 512, units[3], 1),
  ]
  return blocks[:num_blocks]


def plan_units(blocks: Sequence[Block],
               output_stride: Optional[int],
               root_stride: int = ROOT_STRIDE) -> List[UnitPlan]:
  """Strides and atrous rates of every unit, exactly as Slim's stack_blocks_dense.

  Args:
    blocks: the block list.
    output_stride: requested ratio of input to output resolution, or None for
      the nominal stride. Must be a multiple of `root_stride` when given.
    root_stride: stride of the root block (4 for conv1 + pool1, 1 without).

  Returns:
    One `UnitPlan` per unit, in order.

  Raises:
    ValueError: if the output stride is not a multiple of the root stride or
      cannot be reached with these blocks.
  """
  target = None
  if output_stride is not None:
    if output_stride <= 0 or output_stride % root_stride != 0:
      raise ValueError(f'output_stride must be a positive multiple of '
                       f'{root_stride}, got {output_stride}.')
    target = output_stride // root_stride
  current_stride = 1
  rate = 1
  plan = []
  for block in blocks:
    for i in range(block.num_units):
      stride = block.stride if i == block.num_units - 1 else 1
      if target is not None and current_stride > target:
        raise ValueError(f'The target output_stride {output_stride} cannot be '
                         f'reached.')
      if target is not None and current_stride == target:
        plan.append(UnitPlan(block.scope, i + 1, 4 * block.base_depth,
                             block.base_depth, 1, rate))
        rate *= stride
      else:
        plan.append(UnitPlan(block.scope, i + 1, 4 * block.base_depth,
                             block.base_depth, stride, 1))
        current_stride *= stride
  if target is not None and current_stride != target:
    raise ValueError(f'The target output_stride {output_stride} cannot be '
                     f'reached: these blocks have a nominal stride of '
                     f'{current_stride * root_stride}.')
  return plan


def nominal_stride(blocks: Sequence[Block], root_stride: int = ROOT_STRIDE):
  return root_stride * math.prod(b.stride for b in blocks)


class ResNetV2(tf_keras.Model):
  """TF-Slim ResNet-v2 trunk returning its end points.

  Args:
    blocks: list of `Block`; `resnet_v2_blocks(101, 3)` is the paper's trunk.
    output_stride: None for the nominal stride, else a multiple of 4 (Slim
      raises on a stride it cannot reach, and so does this).
    include_root_block: whether conv1/pool1 come first.
    include_postnorm: apply Slim's final BN+ReLU (`postnorm`) after the last
      block, as the full Slim network does. The paper's trunk to block 3
      has none.
    scope: Slim scope, the prefix of every end point and variable name.
    weight_decay: L2 weight decay on conv kernels (Slim convention).
    native_atrous: run dilated convolutions as single Conv2D ops
      (`slim_layers.NativeAtrousConv2D`); same function, same variables.

  Calling it on an image batch returns an ordered dict {end point: tensor}:
  `<scope>/conv1` (when the root is included), every unit
  `<scope>/blockN/unit_M/bottleneck_v2`, every block `<scope>/blockN`, and
  `<scope>/postnorm` when included. `output_name` names the last one.
  """

  def __init__(self, blocks: Sequence[Block], output_stride: Optional[int] = None,
               include_root_block: bool = True, include_postnorm: bool = False,
               scope: str = 'resnet_v2',
               weight_decay: float = slim_layers.WEIGHT_DECAY,
               native_atrous: bool = False, **kwargs):
    kwargs.setdefault('name', scope)
    super().__init__(**kwargs)
    blocks = list(blocks)
    if not blocks:
      raise ValueError('ResNetV2 needs at least one block.')
    self.block_specs = blocks
    self.output_stride = output_stride
    self.include_root_block = include_root_block
    self.include_postnorm = include_postnorm
    self.scope = scope
    self.weight_decay = weight_decay
    self.native_atrous = native_atrous
    root_stride = ROOT_STRIDE if include_root_block else 1
    self.unit_plan = plan_units(blocks, output_stride, root_stride)
    if include_root_block:
      self.conv1 = slim_layers.SlimConv2D(
          64, 7, 2, batch_norm=False, activation=False,
          weight_decay=weight_decay, name='conv1')
    else:
      self.conv1 = None
    self.units = [
        slim_layers.BottleneckV2(
            u.depth, u.depth_bottleneck, u.stride, u.rate,
            weight_decay=weight_decay, native_atrous=native_atrous,
            name=u.scope)
        for u in self.unit_plan
    ]
    self.postnorm = (slim_layers.slim_batch_norm('postnorm')
                     if include_postnorm else None)
    last_units = {(b.scope, b.num_units) for b in blocks}
    self._ends_block = [(u.block, u.index) in last_units for u in self.unit_plan]

  @property
  def block_names(self) -> List[str]:
    return [f'{self.scope}/{b.scope}' for b in self.block_specs]

  def unit_names(self, block: Optional[str] = None) -> List[str]:
    """End-point names of the units, optionally of one block (e.g. 'block3')."""
    return [f'{self.scope}/{u.scope}' for u in self.unit_plan
            if block is None or u.block == block]

  @property
  def output_name(self) -> str:
    if self.include_postnorm:
      return f'{self.scope}/postnorm'
    return self.block_names[-1]

  @property
  def output_depth(self) -> int:
    return 4 * self.block_specs[-1].base_depth

  @property
  def effective_output_stride(self) -> int:
    if self.output_stride is not None:
      return self.output_stride
    return nominal_stride(self.block_specs,
                          ROOT_STRIDE if self.include_root_block else 1)

  def call(self, inputs, training=None):
    end_points = collections.OrderedDict()
    net = inputs
    if self.conv1 is not None:
      net = self.conv1(net)
      end_points[f'{self.scope}/conv1'] = net
      net = tf.nn.max_pool2d(net, ksize=3, strides=2, padding='SAME')
    for plan, unit, ends_block in zip(self.unit_plan, self.units,
                                      self._ends_block):
      net = unit(net, training=training)
      end_points[f'{self.scope}/{plan.scope}'] = net
      if ends_block:
        end_points[f'{self.scope}/{plan.block}'] = net
    if self.postnorm is not None:
      net = tf.nn.relu(self.postnorm(net, training=training))
      end_points[f'{self.scope}/postnorm'] = net
    return end_points

  def slim_variables(self) -> Dict[str, tf.Variable]:
    """{Slim variable name: Keras variable}; the model must be built."""
    if not self.built:
      raise ValueError('Build the model (call it once) before asking for its '
                       'Slim variables.')
    out = {}
    if self.conv1 is not None:
      out.update(self.conv1.slim_variables(f'{self.scope}/conv1'))
    for plan, unit in zip(self.unit_plan, self.units):
      out.update(unit.slim_variables(f'{self.scope}/{plan.scope}'))
    if self.postnorm is not None:
      out.update(slim_layers.batch_norm_variables(self.postnorm,
                                                  f'{self.scope}/postnorm'))
    return out

  def build_for_input(self, channels: int = 3):
    """Creates the variables for inputs of any spatial size; returns self."""
    self.build((None, None, None, channels))
    return self

  @property
  def checkpoint_items(self):
    """Objects to checkpoint so that the trunk restores on its own."""
    return {'backbone': self}

  def get_config(self):
    return {
        'blocks': [dataclasses.asdict(b) for b in self.block_specs],
        'output_stride': self.output_stride,
        'include_root_block': self.include_root_block,
        'include_postnorm': self.include_postnorm,
        'scope': self.scope,
        'weight_decay': self.weight_decay,
        'native_atrous': self.native_atrous,
    }

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    config['blocks'] = [Block(**b) for b in config['blocks']]
    return cls(**config)


def resnet_v2(depth: int, num_blocks: int = 4, output_stride: Optional[int] = None,
              include_postnorm: Optional[bool] = None, scope: Optional[str] = None,
              **kwargs) -> ResNetV2:
  """resnet_v2_<depth> cut after `num_blocks` blocks (Slim scope by default).

  `include_postnorm` defaults to True only for the full four-block network, as
  in Slim; a trunk cut earlier ends on the raw block output.
  """
  if include_postnorm is None:
    include_postnorm = num_blocks == 4
  return ResNetV2(resnet_v2_blocks(depth, num_blocks), output_stride=output_stride,
                  include_postnorm=include_postnorm,
                  scope=scope or f'resnet_v2_{depth}', **kwargs)


def resnet_v2_50(**kwargs):
  return resnet_v2(50, **kwargs)


def resnet_v2_101(**kwargs):
  return resnet_v2(101, **kwargs)


def resnet_v2_152(**kwargs):
  return resnet_v2(152, **kwargs)


def paper_trunk(output_stride: int = 8, **kwargs) -> ResNetV2:
  """The paper's trunk: resnet_v2_101 up to block 3 at output stride 8."""
  return resnet_v2(101, num_blocks=3, output_stride=output_stride, **kwargs)


# Named trunks. The resnet_v2_* ones are the Slim networks cut after block 3
# (the paper's trunk is resnet_v2_101); the small ones keep the same structure
# (three blocks, stride on the last unit, block 3 of several units for the
# lasso) at a size a 2-core CPU trains in minutes, for the default run and
# tests.
TRUNK_BLOCKS = {
    'resnet_v2_50': lambda: resnet_v2_blocks(50, 3),
    'resnet_v2_101': lambda: resnet_v2_blocks(101, 3),
    'resnet_v2_152': lambda: resnet_v2_blocks(152, 3),
    'resnet_v2_200': lambda: resnet_v2_blocks(200, 3),
    'resnet_v2_small': lambda: [Block('block1', 16, 2, 2), Block('block2', 32, 2, 2),
                                Block('block3', 64, 4, 2)],
    'resnet_v2_tiny': lambda: [Block('block1', 8, 1, 2), Block('block2', 16, 1, 2),
                               Block('block3', 32, 3, 2)],
}


def check_trunk(name: str, output_stride: Optional[int]) -> None:
  """ValueError unless `name` is a known trunk that can have `output_stride`.

  The message of an unknown name starts with "Unknown trunk"; otherwise it is
  the stride planner's.
  """
  if name not in TRUNK_BLOCKS:
    raise ValueError(f'Unknown trunk {name!r}; choose one of '
                     f'{", ".join(sorted(TRUNK_BLOCKS))}.')
  plan_units(TRUNK_BLOCKS[name](), output_stride)


def trunk_from_name(name: str, output_stride: Optional[int] = 8,
                    **kwargs) -> ResNetV2:
  """A named trunk (see TRUNK_BLOCKS) with Slim scope `name`."""
  if name not in TRUNK_BLOCKS:
    check_trunk(name, output_stride)
  return ResNetV2(TRUNK_BLOCKS[name](), output_stride=output_stride,
                  scope=name, **kwargs)
