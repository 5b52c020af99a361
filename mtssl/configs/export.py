"""Configuration of `python -m mtssl.export` (flags generated from it)."""

import dataclasses
from typing import Optional, Tuple

from mtssl.backbones import resnet_v2
from mtssl.configs import base
from mtssl.configs.base import ConfigError


def parse_image_size(text: str) -> Tuple[int, int]:
  """'256' -> (256, 256); '240,320' or '240x320' -> (240, 320)."""
  parts = [p.strip() for p in str(text).replace('x', ',').split(',')]
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) == 1:
    sizes = sizes * 2
  if len(sizes) != 2 or min(sizes) < 1:
    raise ConfigError(f'--image_size must be SIZE or HEIGHT,WIDTH with '
                      f'positive integers, got {text!r}.')
  return sizes[0], sizes[1]


@dataclasses.dataclass
class ExportConfig:
  """One export of a trunk checkpoint as a TF Serving version."""
  checkpoint: Optional[str] = base.field(
      None, 'trunk checkpoint (prefix or directory) with a `backbone` key: a '
      'trainer checkpoint or a converted Slim checkpoint; required')
  trunk: str = base.field('resnet_v2_101', 'trunk name, one of '
                          + ', '.join(sorted(resnet_v2.TRUNK_BLOCKS)))
  output_stride: int = base.field(8, 'output stride the trunk is served at '
                                  '(8 as in training; 16 for detection)')
  export_base: Optional[str] = base.field(
      None, 'TF Serving base directory; the model goes to '
      '<export_base>/<model_name>/<version>; required')
  model_name: str = base.field('mtssl', 'TF Serving model name')
  version: Optional[int] = base.field(
      None, 'version number; None: one more than the largest existing '
      'version')
  image_size: str = base.field('256', 'size encoded images are resized to: '
                               'SIZE or HEIGHT,WIDTH')
  overwrite: bool = base.field(False, 'replace an existing version')

  def serving_size(self) -> Tuple[int, int]:
    return parse_image_size(self.image_size)

  def validate(self):
    """Checks the size, trunk and stride; ConfigError naming the flag."""
    self.serving_size()
    try:
      resnet_v2.check_trunk(self.trunk, self.output_stride)
    except ValueError as e:
      if self.trunk not in resnet_v2.TRUNK_BLOCKS:
        raise ConfigError(f'--trunk: {e}') from None
      raise ConfigError(f'--output_stride={self.output_stride}: {e}') from None
