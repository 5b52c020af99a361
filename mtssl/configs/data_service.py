"""Configuration of `python -m mtssl.data_service` (flags --<field>)."""

import dataclasses
from typing import Optional

from mtssl.configs import base


@dataclasses.dataclass
class DataServiceConfig:
  """A dispatcher and workers, or only workers joining a dispatcher."""
  port: int = base.field(5050, 'dispatcher port (0: any free port)')
  workers: int = base.field(1, 'workers to start here')
  dispatcher: Optional[str] = base.field(
      None, 'HOST:PORT of a running dispatcher: start only workers')
  worker_host: str = base.field(
      'localhost', 'name under which clients reach this machine\'s workers')

  def validate(self):
    if self.port < 0:
      raise base.ConfigError(f'port must be >= 0, got {self.port}.')
    if self.workers < 0:
      raise base.ConfigError(f'workers must be >= 0, got {self.workers}.')
