"""Evaluation protocols by name.

A protocol module registers its `runner.Protocol` subclass with
`@register_protocol('name')`; the class names its config dataclass
(`config_class`) and the kind of labeled data it reads (`data_kind`).
`MODULES` says where each protocol lives, so that only the protocol a run
uses is imported (and TensorFlow only then).
"""

import importlib
from typing import Dict, Tuple

from mtssl.configs.base import ConfigError

# Protocol name -> the module that registers it.
MODULES = {
    'linear': 'mtssl.evaluation.linear',
    'depth': 'mtssl.evaluation.depth',
    'detection': 'mtssl.evaluation.detection',
}

_PROTOCOLS: Dict[str, type] = {}


def register_protocol(name: str):
  """Class decorator: makes the Protocol subclass available as `name`."""

  def decorate(cls):
    for attr in ('config_class', 'data_kind'):
      if not getattr(cls, attr, None):
        raise TypeError(f'Protocol {cls.__name__} registered as {name!r} has '
                        f'no {attr}.')
    registered = _PROTOCOLS.get(name)
    if registered is not None and registered.__qualname__ != cls.__qualname__:
      raise ValueError(f'Protocol {name!r} is already registered '
                       f'({registered.__qualname__}).')
    cls.name = name
    _PROTOCOLS[name] = cls
    return cls

  return decorate


def protocol_names() -> Tuple[str, ...]:
  """Every protocol: the built-in ones, then any registered elsewhere."""
  return tuple(MODULES) + tuple(n for n in _PROTOCOLS if n not in MODULES)


def get_protocol(name: str) -> type:
  """The Protocol subclass registered as `name` (importing its module)."""
  if name not in _PROTOCOLS and name in MODULES:
    importlib.import_module(MODULES[name])
  if name not in _PROTOCOLS:
    raise ConfigError(f'Unknown protocol {name!r}; choose one of '
                      f'{", ".join(protocol_names())}.')
  return _PROTOCOLS[name]
