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
  work_dir: Optional[str] = base.field(
      None, 'the dispatcher\'s journal: a dispatcher restarted with the same '
      'work_dir and port resumes its jobs (without one a restarted '
      'dispatcher knows none)')

  def validate(self):
    if self.port < 0:
      raise base.ConfigError(f'port must be >= 0, got {self.port}.')
    if self.workers < 0:
      raise base.ConfigError(f'workers must be >= 0, got {self.workers}.')
    if self.work_dir and self.dispatcher:
      raise base.ConfigError('work_dir is the dispatcher\'s journal; this '
                             'process starts no dispatcher (--dispatcher is '
                             'set).')
