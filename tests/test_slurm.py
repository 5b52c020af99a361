"""tools/cluster/slurm.sbatch: its script logic, and a real one-node Slurm run.

TemplateScriptTest runs the template with a stand-in srun (no Slurm needed).

SlurmTemplateTest's class set-up installs Slurm and munge when they are
absent (Debian's slurmctld, slurmd, slurm-client and munge, as root), writes
a slurm.conf for one node (localhost, this machine's CPUs and memory) in a
temporary directory, and starts munged, slurmctld and slurmd as root on free
ports. The test submits the template with sbatch: a coordinator, 1 parameter
server and 2 workers (rp: 1, col: 1) as 4 Slurm tasks on the node, training
a tiny trunk for a few rounds. The class cleanup cancels the job, stops the
three daemons and ends every process the cluster started (step daemons and
job processes included), also when a test fails. Where this machine does not
allow it (not root, no apt-get, the packages cannot be installed, a daemon
does not start), the class is skipped with the reason.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import tensorflow as tf

from mtssl.configs import training as configs
from mtssl import train
from mtssl.training.cluster import plan as cluster_plan
from mtssl.training import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, 'tools', 'cluster', 'slurm.sbatch')
PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge')
PROGRAMS = ('munged', 'munge', 'slurmctld', 'slurmd', 'sbatch', 'scontrol',
            'scancel', 'squeue')
# Set in the environment of every daemon and job process this test starts,
# so that the cleanup can find and end all of them (and nothing else).
MARKER = 'MTSSL_SLURM_TEST'
INSTALL_TIMEOUT = 300.0  # seconds: apt-get update + install (measured 7 s)
START_TIMEOUT = 60.0  # seconds: daemons up, node idle (measured 3 s)
# seconds: the job; measured 42 s on 2 idle cores, 138-170 s at load 8-12.
JOB_TIMEOUT = 480.0

TASKS = ('rp', 'col')
STEPS = 4
RUN_FIELDS = {'trunk': 'resnet_v2_tiny', 'seed': 5, 'steps': STEPS,
              'log_every': 1, 'summary_every': 1000,
              'image_summary_every': 100000}
TASK_FIELDS = {
    'rp': {'batch_size': 2, 'patch_size': 32, 'gap': 16, 'jitter': 3,
           'min_pixels': 20000, 'max_pixels': 30000, 'unit_depths': (32, 16),
           'unit_bottleneck': 8, 'fc_bottleneck': 16},
    'col': {'batch_size': 2, 'image_size': 64, 'head_widths': (32, 32)},
}


def _flag_value(value):
  return ','.join(map(str, value)) if isinstance(value, tuple) else value


def training_flags(model_dir, port_base):
  flags = [f'--tasks={",".join(TASKS)}', '--task_workers=rp:1,col:1',
           f'--model_dir={model_dir}', f'--slurm_port_base={port_base}']
  flags += [f'--{k}={v}' for k, v in RUN_FIELDS.items()]
  flags += [f'--{t}_{k}={_flag_value(v)}' for t in TASKS
            for k, v in TASK_FIELDS[t].items()]
  return flags


def make_config(model_dir):
  """The TrainConfig the flags above describe."""
  config = configs.cpu_config(list(TASKS))
  config = dataclasses.replace(config, model_dir=model_dir, **RUN_FIELDS)
  for name, run in config.tasks.items():
    config.tasks[name] = dataclasses.replace(
        run, config=dataclasses.replace(run.config, **TASK_FIELDS[name]))
  return config


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _free_port_range(count, low=20000, high=30000):
  """A first port p such that p .. p+count-1 are free on localhost."""
  for base in range(low + os.getpid() % 1000 * 10, high, count):
    try:
      with contextlib.ExitStack() as stack:
        for port in range(base, base + count):
          s = stack.enter_context(socket.socket())
          s.bind(('127.0.0.1', port))
      return base
    except OSError:
      continue
  raise OSError(f'no {count} consecutive free ports in {low}-{high}')


def _tail(path, lines=30):
  try:
    with open(path, errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError as e:
    return f'({path}: {e})'


def _marked_pids(marker_value):
  """Processes whose environment holds MARKER=marker_value (not this one)."""
  needle = f'{MARKER}={marker_value}'.encode()
  pids = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit() or int(entry) == os.getpid():
      continue
    try:
      with open(f'/proc/{entry}/environ', 'rb') as f:
        if needle in f.read().split(b'\0'):
          pids.append(int(entry))
    except OSError:
      continue
  return pids


def _install_slurm():
  """Installs the Debian packages; returns None, or why it could not."""
  if not shutil.which('apt-get'):
    return 'Slurm is not installed and there is no apt-get to install it'
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  # Keep the packages' own system services from starting (policy-rc.d
  # status 101: "action forbidden"), where nothing else says so already.
  policy = '/usr/sbin/policy-rc.d'
  own_policy = not os.path.exists(policy)
  if own_policy:
    with open(policy, 'w') as f:
      f.write('#!/bin/sh\nexit 101\n')
    os.chmod(policy, 0o755)
  try:
    for cmd in (['apt-get', 'update'],
                ['apt-get', 'install', '-y', '--no-install-recommends',
                 '-o', 'DPkg::Lock::Timeout=60', *PACKAGES]):
      try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT, check=False)
      except subprocess.TimeoutExpired:
        return f'{" ".join(cmd[:2])} took over {INSTALL_TIMEOUT:.0f} s'
      if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return (f'{" ".join(cmd[:2])} failed with status {proc.returncode}: '
                f'{last[-1] if last else "(no output)"}')
  finally:
    if own_policy:
      os.remove(policy)
  missing = [p for p in PROGRAMS if not shutil.which(p)]
  if missing:
    return f'installed {", ".join(PACKAGES)} but {", ".join(missing)} missing'
  return None


def _slurm_conf(tmp, ctld_port, slurmd_port):
  cpus = min(os.cpu_count() or 1, len(os.sched_getaffinity(0)))
  # Slurm's own measure of the node's memory, in MiB.
  memory = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2**20
  return f"""\
ClusterName=mtssltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={tmp}/munge.socket
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class TemplateScriptTest(tf.test.TestCase):
  """The template's flags, threads and attempts, with a stand-in srun."""

  def run_template(self, args, srun_status=0, **env):
    tmp = self.get_temp_dir()
    calls = os.path.join(tmp, 'srun_calls')
    srun = os.path.join(tmp, 'srun')
    # Records each call (one argument a line, then the thread settings).
    quoted = shlex.quote(calls)  # temporary paths may hold shell characters
    with open(srun, 'w') as f:
      f.write('#!/bin/bash\n'
              f'printf "%s\\n" "$@" >> {quoted}\n'
              f'echo "threads $TF_NUM_INTRAOP_THREADS $OMP_NUM_THREADS" >> {quoted}\n'
              f'echo ---- >> {quoted}\n'
              f'exit {srun_status}\n')
    os.chmod(srun, 0o755)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(('SLURM_', 'MTSSL_', 'TF_NUM_', 'OMP_'))}
    proc = subprocess.run(
        ['bash', TEMPLATE, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=30, check=False,
        env=dict(clean, PATH=tmp + os.pathsep + clean.get('PATH', ''), **env))
    with open(calls) as f:
      return proc, [c.split('\n')[:-1] for c in f.read().split('----\n')[:-1]]

  def test_arguments_replace_the_default_run(self):
    proc, calls = self.run_template(['--tasks=rp', '--steps=3'],
                                    SLURM_CPUS_PER_TASK='6')
    self.assertEqual(proc.returncode, 0, msg=proc.stderr)
    self.assertEqual(calls, [[
        '--kill-on-bad-exit=1', '--cpus-per-task=6', 'python', '-m',
        'mtssl.train', '--cluster_resolver=slurm', '--tasks=rp', '--steps=3',
        'threads 6 6']])

  def test_default_run_reads_data_and_model_dir_from_the_environment(self):
    proc, calls = self.run_template(
        [], SLURM_JOB_ID='77', MTSSL_IMAGES='folder:/img',
        TF_NUM_INTRAOP_THREADS='2')
    self.assertEqual(proc.returncode, 0, msg=proc.stderr)
    self.assertEqual(calls, [[
        '--kill-on-bad-exit=1', '--cpus-per-task=1', 'python', '-m',
        'mtssl.train', '--cluster_resolver=slurm',
        '--flagfile=flags/rp_col_ex_ms.flags',
        '--task_workers=rp:4,col:4,ex:4,ms:4', '--rp_data=folder:/img',
        '--col_data=folder:/img', '--ex_data=folder:/img',
        '--ms_data=tfrecord:/data/motion_labels',
        '--model_dir=runs/rp_col_ex_ms-77', 'threads 2 1']])
    # The default flags are a valid run of mtssl.train, and the template's
    # --ntasks leaves at least one parameter server.
    args = [a.replace('=flags/', f'={ROOT}/flags/') for a in calls[0][5:-1]]
    train.FLAGS.unparse_flags()
    try:
      train.FLAGS(['mtssl.train', *args])
      config = train.config_from_flags()
      plan = cluster_plan.ClusterPlan.from_strings(config,
                                                  train.FLAGS.task_workers)
    finally:
      train.FLAGS.unparse_flags()
    self.assertEqual(list(config.tasks), ['rp', 'col', 'ex', 'ms'])
    self.assertEqual(config.trunk, 'resnet_v2_101')
    self.assertEqual(config.model_dir, 'runs/rp_col_ex_ms-77')
    self.assertEqual({n: r.data for n, r in config.tasks.items()},
                     {'rp': 'folder:/img', 'col': 'folder:/img',
                      'ex': 'folder:/img', 'ms': 'tfrecord:/data/motion_labels'})
    with open(TEMPLATE) as f:
      ntasks = int(re.search(r'^#SBATCH --ntasks=(\d+)$', f.read(), re.M)[1])
    self.assertEqual(ntasks - 1 - plan.num_workers, 2)

  def test_a_failing_step_is_retried_up_to_the_attempts(self):
    proc, calls = self.run_template(['--steps=3'], srun_status=4,
                                    MTSSL_ATTEMPTS='3')
    self.assertEqual(proc.returncode, 1)
    self.assertLen(calls, 3)
    self.assertIn('All 3 attempts failed.', proc.stdout)


class SlurmTemplateTest(tf.test.TestCase):
  """The template on a one-node Slurm cluster started by the class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not sys.platform.startswith('linux'):
      raise unittest.SkipTest(f'Slurm runs on Linux only, not {sys.platform}')
    if os.geteuid() != 0:
      raise unittest.SkipTest(
          f'the Slurm daemons run as root here; uid is {os.geteuid()}')
    if any(not shutil.which(p) for p in PROGRAMS):
      reason = _install_slurm()
      if reason:
        raise unittest.SkipTest(reason)
    cls.tmp = tempfile.mkdtemp(prefix='mtssl_slurm_')
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
    os.makedirs(os.path.join(cls.tmp, 'state'))
    os.makedirs(os.path.join(cls.tmp, 'spool'))
    cls.conf = os.path.join(cls.tmp, 'slurm.conf')
    with open(cls.conf, 'w') as f:
      f.write(_slurm_conf(cls.tmp, _free_port(), _free_port()))
    key = os.path.join(cls.tmp, 'munge.key')
    with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), 'wb') as f:
      f.write(os.urandom(128))
    cls.env = dict(os.environ, SLURM_CONF=cls.conf, PYTHONPATH=ROOT,
                   TF_CPP_MIN_LOG_LEVEL='2', **{MARKER: cls.tmp})
    # The job runs `python` from PATH: this interpreter.
    cls.env['PATH'] = (os.path.dirname(sys.executable) + os.pathsep
                       + cls.env.get('PATH', ''))
    cls.daemons = {}
    cls.addClassCleanup(cls.stop_cluster)
    cls.start('munged', ['munged', '-F', '--force',
                         f'--socket={cls.tmp}/munge.socket',
                         f'--key-file={key}',
                         f'--pid-file={cls.tmp}/munged.pid',
                         f'--seed-file={cls.tmp}/munged.seed',
                         f'--log-file={cls.tmp}/munged.file.log'])
    cls.wait_until('munged', lambda: subprocess.run(
        ['munge', '-n', '-S', f'{cls.tmp}/munge.socket'], env=cls.env,
        capture_output=True, check=False).returncode == 0)
    cls.start('slurmctld', ['slurmctld', '-D', '-f', cls.conf])
    cls.start('slurmd', ['slurmd', '-D', '-N', 'localhost', '-f', cls.conf])
    cls.wait_until('slurmd', lambda: re.search(
        r'State=IDLE\b', cls.slurm('scontrol', 'show', 'node', 'localhost',
                                   check=False).stdout))

  # Cluster ------------------------------------------------------------------
  @classmethod
  def log_path(cls, name):
    return os.path.join(cls.tmp, f'{name}.log')

  @classmethod
  def start(cls, name, cmd):
    with open(cls.log_path(name), 'w') as log:
      cls.daemons[name] = subprocess.Popen(
          cmd, env=cls.env, stdout=log, stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL, cwd=cls.tmp)

  @classmethod
  def wait_until(cls, what, ready):
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
      for name, proc in cls.daemons.items():
        if proc.poll() is not None:
          raise unittest.SkipTest(
              f'{name} could not start here (status {proc.returncode}): '
              + _tail(cls.log_path(name), 3).strip().replace('\n', ' | '))
      if ready():
        return
      time.sleep(0.5)
    logs = ' | '.join(f'{n}: ' + _tail(cls.log_path(n), 2).strip()
                      for n in cls.daemons)
    raise unittest.SkipTest(f'{what} not ready after {START_TIMEOUT:.0f} s; '
                       f'{logs}')

  @classmethod
  def slurm(cls, *cmd, check=True, timeout=30, env=None):
    return subprocess.run(list(cmd), env=env or cls.env, capture_output=True,
                          text=True, timeout=timeout, check=check)

  @classmethod
  def wait_for_job(cls, job, timeout):
    """`scontrol show job` once the job has ended; None after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      info = cls.slurm('scontrol', 'show', 'job', job).stdout
      state = re.search(r'JobState=(\w+)', info)
      if state and state[1] not in ('PENDING', 'CONFIGURING', 'RUNNING',
                                    'COMPLETING', 'SUSPENDED', 'REQUEUED'):
        return info
      time.sleep(0.5)
    return None

  @classmethod
  def stop_cluster(cls):
    """Cancels every job, stops the daemons and ends what they started."""
    if 'slurmctld' in cls.daemons and cls.daemons['slurmctld'].poll() is None:
      try:
        cls.slurm('scancel', '--full', '--partition=test', check=False)
        deadline = time.time() + 20
        while time.time() < deadline and cls.slurm(
            'squeue', '-h', check=False, timeout=10).stdout.strip():
          time.sleep(0.5)
      except subprocess.TimeoutExpired:
        pass
    for name in ('slurmd', 'slurmctld', 'munged'):
      proc = cls.daemons.get(name)
      if proc is None or proc.poll() is not None:
        continue
      proc.terminate()
      try:
        proc.wait(timeout=15)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # Step daemons and job processes outlive slurmd; they carry the marker.
    for pid in _marked_pids(cls.tmp):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass

  # Test ---------------------------------------------------------------------
  def test_template_runs_a_cluster_job_to_a_restorable_checkpoint(self):
    work = os.path.join(self.tmp, 'job')
    os.makedirs(work)
    model_dir = os.path.join(work, 'run')
    log = os.path.join(work, 'job-%j.log')
    env = dict(self.env, MTSSL_ATTEMPTS='1')
    # 4 tasks on a node that may have fewer CPUs: --overcommit. The tiny run
    # needs far less than the template's 4G per CPU.
    cmd = ['sbatch', '--parsable', '--ntasks=4', '--nodes=1',
           '--cpus-per-task=1', '--overcommit', '--mem-per-cpu=1G',
           '--time=10', f'--chdir={work}', f'--output={log}', TEMPLATE,
           *training_flags(model_dir, _free_port_range(4))]
    started = time.time()
    job = self.slurm(*cmd, env=env).stdout.strip().split(';')[0]
    # Polled here: `sbatch --wait` sleeps up to 10 s between its polls
    # (measured: it returned 16 s after the job's end time).
    info = self.wait_for_job(job, JOB_TIMEOUT)
    if info is None:
      self.fail(f'Job {job} still runs after {JOB_TIMEOUT:.0f} s:\n'
                + _tail(log.replace('%j', job), 40))
    job_log = _tail(log.replace('%j', job), 60)
    self.assertRegex(info, r'JobState=COMPLETED\b',
                     msg=f'{info}\njob log:\n{job_log}')
    self.assertRegex(info, r'\bExitCode=0:0\b', msg=info)
    self.assertRegex(info, r'\bNumTasks=4\b', msg=info)
    print(f'Slurm job {job}: {time.time() - started:.0f} s')

    # Every Slurm task played its role: rank 0 coordinated, then 1 ps and
    # 2 workers, each worker on its own task.
    full_log = _tail(log.replace('%j', job), 100000)
    for role in ('ps 0', 'worker 0', 'worker 1'):
      self.assertIn(f'Serving as {role} at localhost:', full_log)
    with open(os.path.join(model_dir, cluster_plan.RESULT_FILE)) as f:
      result = json.load(f)
    self.assertEqual(result['worker_tasks'], {'0': 'rp', '1': 'col'})
    self.assertEqual(sum(result['task_steps'].values()), STEPS, msg=result)

    # The checkpoint restores into a single-process trainer of the same
    # configuration (its restore asserts that every object matched).
    checkpoint = result['checkpoint']
    self.assertEqual(tf.train.latest_checkpoint(model_dir), checkpoint)
    trainer = trainer_lib.Trainer(make_config(model_dir)).setup()
    self.assertEqual(trainer.run.resumed_from, checkpoint)
    reader = tf.train.load_checkpoint(checkpoint)
    for name in TASKS:
      self.assertEqual(
          int(trainer.state.task_steps[name].numpy()),
          result['task_steps'][name])
      self.assertEqual(int(reader.get_tensor(
          f'state/task_steps/{name}/.ATTRIBUTES/VARIABLE_VALUE')),
                       result['task_steps'][name])
    variables = trainer.model.trunk.trainable_variables
    self.assertNotEmpty(variables)
    fresh = trainer_lib.Trainer(make_config(os.path.join(work, 'fresh')))
    fresh.setup()
    # The restored trunk holds the trained weights, not the initial ones.
    changed = [not tf.reduce_all(tf.equal(a, b)).numpy() for a, b in
               zip(variables, fresh.model.trunk.trainable_variables)]
    self.assertTrue(any(changed))


if __name__ == '__main__':
  tf.test.main()
