"""A whole ParameterServerStrategy cluster on this machine, as real processes.

Parameter servers, workers and the coordinator run on free localhost ports,
each with its own TF_CONFIG and process group; `stop()` (also on leaving the
`with` block) ends them all. With `data_service_workers=N` a tf.data service
(`python -m mtssl.data_service`: a dispatcher and N workers, one process)
starts with the servers and every process gets `--data_service=` its
address. tools/launch_local_cluster.py is the front end.

Typical use:

    with LocalCluster(['-m', 'mtssl.train', '--tasks=rp,col'], num_ps=1,
                      num_workers=3, log_dir='/tmp/logs') as c:
      c.start_servers()
      c.start_coordinator()
      rc = c.wait_coordinator(timeout=3600)
"""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

CHIEF, PS, WORKER = 'chief', 'ps', 'worker'
DATA_SERVICE = 'data_service'  # not a cluster job: no TF_CONFIG entry
RECONNECT_OPTIONS = 'grpc.max_reconnect_backoff_ms=1000'


class ClusterProcessError(RuntimeError):
  """A cluster process failed to start; the message ends with its log."""


# Where free_ports looks when the kernel does not say: Linux's default
# ephemeral range starts at 32768.
_LOWEST_PORT, _DEFAULT_EPHEMERAL_LOW = 10000, 32768


def _ephemeral_low() -> int:
  """The first port of the range the kernel gives outgoing connections."""
  try:
    with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
      return int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return _DEFAULT_EPHEMERAL_LOW


def free_ports(count: int, host: str = 'localhost') -> List[int]:
  """`count` distinct ports that were free a moment ago.

  They are drawn at random below the kernel's ephemeral range: a port the
  kernel picked (bind to port 0) is one it may also give the next outgoing
  connection of any process, such as a gRPC client of another local
  cluster, before the server it was chosen for binds it.
  """
  low = _ephemeral_low()
  candidates = (random.SystemRandom().sample(range(_LOWEST_PORT, low),
                                             low - _LOWEST_PORT)
                if low - _LOWEST_PORT >= 4 * count else [0] * count)
  sockets, ports = [], []
  try:
    for port in candidates:
      if len(ports) == count:
        break
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      try:
        s.bind((host, port))
      except OSError:
        s.close()
        continue
      sockets.append(s)
      ports.append(s.getsockname()[1])
  finally:
    for s in sockets:
      s.close()
  if len(ports) < count:
    raise OSError(f'no {count} free ports on {host} below {low}')
  return ports


def _port_open(host, port) -> bool:
  with contextlib.suppress(OSError):
    with socket.create_connection((host, port), timeout=0.5):
      return True
  return False


class LocalCluster:
  """Processes of one cluster on localhost.

  Args:
    args: the command after the Python interpreter, identical for every
      process (e.g. ['-m', 'mtssl.train', '--tasks=...', ...]).
    num_ps, num_workers: cluster size (plus one coordinator, job `chief`).
    log_dir: one log file per process (`<job>-<index>.log`, appended to
      across restarts).
    env: extra environment variables for every process.
    cwd: working directory of the processes (default: the current one).
    data_service_workers: when > 0, a tf.data service with this many workers
      runs the input pipelines (job DATA_SERVICE, index 0).
  """

  def __init__(self, args: Sequence[str], num_ps: int = 1,
               num_workers: int = 2, log_dir: str = 'cluster_logs',
               env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
               host: str = 'localhost', data_service_workers: int = 0):
    if num_ps < 1 or num_workers < 1:
      raise ValueError('A cluster needs at least one ps and one worker.')
    if data_service_workers < 0:
      raise ValueError('data_service_workers must be >= 0.')
    self.args = list(args)
    self.host = host
    self.log_dir = log_dir
    self.env = dict(env or {})
    self.cwd = cwd
    ports = free_ports(2 + num_ps + num_workers, host)
    self.addresses = {
        CHIEF: [f'{host}:{ports[0]}'],
        PS: [f'{host}:{p}' for p in ports[1:1 + num_ps]],
        WORKER: [f'{host}:{p}' for p in ports[1 + num_ps:-1]],
    }
    self.data_service_workers = data_service_workers
    self.data_service = None  # the dispatcher's HOST:PORT
    if data_service_workers:
      self.data_service = f'{host}:{ports[-1]}'
      self.args.append(f'--data_service=grpc://{self.data_service}')
    self.processes: Dict[tuple, subprocess.Popen] = {}
    self._logs = {}
    os.makedirs(log_dir, exist_ok=True)

  # Processes ------------------------------------------------------------
  def tf_config(self, job: str, index: int) -> str:
    return json.dumps({'cluster': self.addresses,
                       'task': {'type': job, 'index': index}})

  def address(self, job: str, index: int = 0) -> str:
    if job == DATA_SERVICE:
      return self.data_service
    return self.addresses[job][index]

  def log_path(self, job: str, index: int = 0) -> str:
    return os.path.join(self.log_dir, f'{job}-{index}.log')

  def start(self, job: str, index: int = 0,
            extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """Starts (or restarts) one process; its output goes to its log file."""
    key = (job, index)
    if key in self.processes and self.processes[key].poll() is None:
      raise ClusterProcessError(f'{job} {index} is already running.')
    env = dict(os.environ)
    env.update(self.env)
    if job == DATA_SERVICE:
      port = self.data_service.rsplit(':', 1)[1]
      argv = ['-m', 'mtssl.data_service', f'--port={port}',
              f'--workers={self.data_service_workers}']
    else:
      env['TF_CONFIG'] = self.tf_config(job, index)
      argv = self.args + list(extra_args)
    env.setdefault('PYTHONUNBUFFERED', '1')
    # gRPC backs off exponentially (to 2 minutes) while a peer is down; a
    # restarted local server is then found late. Retry every second at most.
    env.setdefault('TF_GRPC_DEFAULT_OPTIONS', RECONNECT_OPTIONS)
    log = open(self.log_path(job, index), 'ab')  # pylint: disable=consider-using-with
    log.write(f'\n==== start {job} {index} at {time.ctime()} ====\n'.encode())
    log.flush()
    if key in self._logs:
      self._logs[key].close()
    self._logs[key] = log
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable] + argv, env=env, cwd=self.cwd,
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    self.processes[key] = process
    return process

  def wait_ready(self, job: str, index: int = 0, timeout: float = 120.0):
    """Waits until a server accepts connections; raises if it dies first."""
    host, port = self.address(job, index).rsplit(':', 1)
    deadline = time.time() + timeout
    process = self.processes[(job, index)]
    while time.time() < deadline:
      if process.poll() is not None:
        raise ClusterProcessError(
            f'{job} {index} exited with status {process.returncode} before '
            f'serving. Its log ({self.log_path(job, index)}) ends with:\n'
            f'{self.log_tail(job, index)}')
      if _port_open(host, int(port)):
        return
      time.sleep(0.2)
    raise ClusterProcessError(
        f'{job} {index} does not serve at {self.address(job, index)} after '
        f'{timeout:.0f} s. Its log ends with:\n{self.log_tail(job, index)}')

  def start_servers(self, timeout: float = 120.0):
    """Starts every parameter server and worker (and the data service) and
    waits until they serve."""
    servers = [(job, index) for job in (PS, WORKER)
               for index in range(len(self.addresses[job]))]
    if self.data_service:
      servers.insert(0, (DATA_SERVICE, 0))
    for job, index in servers:
      self.start(job, index)
    for job, index in servers:
      self.wait_ready(job, index, timeout)

  def start_coordinator(self, extra_args: Sequence[str] = ()):
    return self.start(CHIEF, 0, extra_args)

  def wait_coordinator(self, timeout: float) -> int:
    """The coordinator's exit status; subprocess.TimeoutExpired after `timeout`."""
    return self.processes[(CHIEF, 0)].wait(timeout)

  def alive(self, job: str, index: int = 0) -> bool:
    process = self.processes.get((job, index))
    return process is not None and process.poll() is None

  def kill(self, job: str, index: int = 0, sig=signal.SIGKILL,
           timeout: float = 30.0):
    """Sends `sig` to a process's group and waits for it to end."""
    process = self.processes.get((job, index))
    if process is None or process.poll() is not None:
      return
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, sig)
    try:
      process.wait(timeout)
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
      process.wait(10)

  def restart(self, job: str, index: int = 0, wait: bool = True,
              timeout: float = 120.0):
    """Kills (if running) and starts a server again, as a cluster manager does."""
    self.kill(job, index)
    self.start(job, index)
    if wait and job != CHIEF:
      self.wait_ready(job, index, timeout)

  def dead_servers(self) -> List[tuple]:
    return [key for key, p in self.processes.items()
            if key[0] != CHIEF and p.poll() is not None]

  def log_tail(self, job: str, index: int = 0, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
      with open(self.log_path(job, index), 'rb') as f:
        text = f.read().decode('utf-8', 'replace')
      return '\n'.join(text.splitlines()[-lines:])
    return '(no log)'

  def stop(self, grace: float = 10.0):
    """Ends every process group this cluster started (TERM, then KILL)."""
    running = [p for p in self.processes.values() if p.poll() is None]
    for process in running:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for process in running:
      try:
        process.wait(max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        pass
    for process in self.processes.values():
      # The group may outlive its leader (children of the process).
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
      if process.poll() is None:
        process.wait(10)
    for log in self._logs.values():
      log.close()
    self._logs.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.stop()
    return False
