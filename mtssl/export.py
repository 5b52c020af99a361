"""Exports a trunk as a TF Serving feature extractor: `python -m mtssl.export`.

    python -m mtssl.export --checkpoint=/runs/mt/ckpt --export_base=/models

Flags are generated from mtssl.configs.export; usage: README, "Export".
"""

import dataclasses
import sys

from absl import app
from absl import flags

from mtssl.configs import base as config_base
from mtssl.configs import export as configs
from mtssl.deploy import saved_model

EXIT_USAGE = 2


def define_flags(flag_values=None):
  """Defines the flags (on `flag_values`, default absl's FLAGS)."""
  config_base.define_flags(
      configs.ExportConfig,
      flag_values=flag_values if flag_values is not None else flags.FLAGS)


def config_from_flags(flag_values) -> configs.ExportConfig:
  return dataclasses.replace(
      configs.ExportConfig(),
      **config_base.given_values(flag_values, '', configs.ExportConfig))


def main(argv, flag_values=None) -> int:
  """Runs the export the flags describe; 0, or 2 on a refused export."""
  fv = flag_values if flag_values is not None else flags.FLAGS
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return EXIT_USAGE
  try:
    config = config_from_flags(fv)
    config.validate()
    image_size = config.serving_size()
    version, _ = saved_model.version_directory(
        config.export_base, config.model_name, config.version,
        config.overwrite)
    checkpoint = saved_model.resolve_checkpoint(config.checkpoint)
    saved_model.import_serving_apis()
    trunk = saved_model.load_trunk(checkpoint, config.trunk,
                                   config.output_stride)
    result = saved_model.export_saved_model(
        trunk, config.export_base, config.model_name, version, image_size,
        overwrite=config.overwrite, checkpoint=checkpoint)
  except (configs.ConfigError, saved_model.ExportError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  print(f'Exported {config.trunk} (output stride {config.output_stride}, '
        f'serving size {image_size[0]}x{image_size[1]}) from {checkpoint} to '
        f'{result.path}')
  return 0


def run():
  define_flags()
  app.run(main, flags_parser=config_base.parse_command_line)


if __name__ == '__main__':
  run()
