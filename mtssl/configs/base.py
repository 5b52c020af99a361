"""The one configuration convention: dataclass trees whose fields carry their
help text, and absl flags generated from them.

Typical use:

  @dataclasses.dataclass
  class RunConfig:
    steps: int = base.field(100, 'training steps')

  base.define_flags(RunConfig)                  # --steps
  config = base.apply_flags(RunConfig(), FLAGS)  # the given flags applied
"""

import dataclasses
import math
import sys
import typing

from absl import flags


class ConfigError(ValueError):
  """An invalid configuration; the message names the field and the value."""


def field(default, help_text, choices=None, default_factory=None):
  """A config field whose help (and choices) the command-line flags reuse."""
  metadata = {'help': help_text}
  if choices is not None:
    metadata['choices'] = tuple(choices)
  if default_factory is not None:
    return dataclasses.field(default_factory=default_factory,
                             metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


class TupleOf:
  """A tuple-of-numbers field, given on the command line as a comma list."""

  def __init__(self, element):
    self.element = element

  def parse(self, values):
    return tuple(self.element(v) for v in values)


def scalar_type(annotation):
  """Flag kind of a field: int/float/bool/str, TupleOf(int|float), or None."""
  if typing.get_origin(annotation) is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != 1:
      return None
    annotation = args[0]
  if typing.get_origin(annotation) is tuple:
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if args and all(a is args[0] for a in args) and args[0] in (int, float,
                                                                 str):
      return TupleOf(args[0])
    return None
  return annotation if annotation in (int, float, bool, str) else None


def config_fields(cls):
  """(dataclass field, flag kind) of every field of `cls` a flag can set."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    kind = scalar_type(hints.get(f.name))
    if kind is not None:
      yield f, kind


def field_default(f):
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return None


def _show(value):
  if isinstance(value, tuple):
    return ','.join(str(v) for v in value)
  return value


def define_flag(name, kind, help_text, choices=None,
                flag_values=flags.FLAGS):
  """One flag of default None (unset = keep the config's value)."""
  if isinstance(kind, TupleOf):
    flags.DEFINE_list(name, None, f'{help_text} (comma-separated)',
                      flag_values=flag_values)
  elif kind is bool:
    flags.DEFINE_bool(name, None, help_text, flag_values=flag_values)
  elif choices:
    flags.DEFINE_enum(name, None, list(choices), help_text,
                      flag_values=flag_values)
  elif kind is int:
    flags.DEFINE_integer(name, None, help_text, flag_values=flag_values)
  elif kind is float:
    flags.DEFINE_float(name, None, help_text, flag_values=flag_values)
  else:
    flags.DEFINE_string(name, None, help_text, flag_values=flag_values)


def define_flags(cls, prefix: str = '', help_prefix: str = '', defaults=None,
                 flag_values=flags.FLAGS, skip=()):
  """Defines --<prefix><field> for every settable field of dataclass `cls`.

  Each flag's help ends with the value it takes when not given: the field of
  `defaults` (an instance, e.g. the default run's) or the class default.
  """
  for f, kind in config_fields(cls):
    if f.name in skip:
      continue
    default = (getattr(defaults, f.name) if defaults is not None
               else field_default(f))
    help_text = (f'{help_prefix}{f.metadata.get("help", f.name)} '
                 f'(default: {_show(default)!r})')
    define_flag(prefix + f.name, kind, help_text, f.metadata.get('choices'),
                flag_values=flag_values)


def check_finite(config, prefix: str = ''):
  """ConfigError naming the first float field of `config` that is NaN or
  infinite (absl's float flags accept 'nan' and 'inf')."""
  for f, kind in config_fields(type(config)):
    value = getattr(config, f.name)
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
      if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f'{prefix}{f.name} must be a finite number, got '
                          f'{_show(value)}.')


def given_values(flag_values, prefix: str, cls, skip=()):
  """{field: value} for the fields of `cls` whose flag `prefix+field` was set."""
  out = {}
  for f, kind in config_fields(cls):
    if f.name in skip:
      continue
    value = flag_values[prefix + f.name].value
    if value is None:
      continue
    if isinstance(kind, TupleOf):
      try:
        value = kind.parse(value)
      except ValueError:
        raise ConfigError(
            f'--{prefix}{f.name}: expected comma-separated '
            f'{kind.element.__name__} values, got {",".join(value)!r}.'
        ) from None
    for v in (value if isinstance(value, tuple) else (value,)):
      if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f'--{prefix}{f.name} must be a finite number, got '
                          f'{_show(value)}.')
    out[f.name] = value
  return out


def apply_flags(config, flag_values=flags.FLAGS, prefix: str = '', skip=()):
  """`config` (a dataclass instance) with every given flag applied."""
  return dataclasses.replace(
      config, **given_values(flag_values, prefix, type(config), skip))


def parse_command_line(argv, flag_values=flags.FLAGS, exit_status: int = 2):
  """Parses `argv` into `flag_values`; a bad flag prints one line naming it
  and exits with `exit_status` (an entry point's absl flags_parser)."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    print('Pass --helpfull to see every flag.', file=sys.stderr)
    sys.exit(exit_status)
