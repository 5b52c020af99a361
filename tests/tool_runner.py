"""Runs a `tools/` script in this process, as `python tools/<name> ...` would.

A tool defines its absl flags on the global registry when its file runs. The
flags that other modules of this process defined there (mtssl's entry
points define `--seed`, `--trunk`, ...) are set aside while it runs, and the
registry is put back as it was afterwards, so any tool can run here, again
and after the entry points. Error paths use this; each tool's normal run
stays a real process.
"""

import contextlib
import io
import os
import runpy
import sys
from unittest import mock

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


@contextlib.contextmanager
def _absl_flags_only():
  """The global flags registry holds only absl's own flags inside."""
  app.define_help_flags()
  registries = (FLAGS._flags(),  # pylint: disable=protected-access
                FLAGS.flags_by_module_dict(), FLAGS.flags_by_module_id_dict(),
                FLAGS.key_flags_by_module_dict())
  saved = [{k: list(v) if isinstance(v, list) else v for k, v in r.items()}
           for r in registries]
  parsed = FLAGS.is_parsed()
  absl_own = [flag for module, module_flags in saved[1].items()
              if module.startswith('absl.') for flag in module_flags]
  for name, flag in list(registries[0].items()):
    if not any(flag is own for own in absl_own):
      del registries[0][name]
  try:
    yield
  finally:
    for registry, before in zip(registries, saved):
      registry.clear()
      registry.update(before)
    if parsed:
      FLAGS.mark_as_parsed()
    else:
      FLAGS.unparse_flags()


def run_tool(name, *args):
  """(exit status, stdout, stderr) of `python tools/<name> args...`."""
  path = os.path.join(ROOT, 'tools', name)
  out, err = io.StringIO(), io.StringIO()
  with _absl_flags_only(), mock.patch.object(sys, 'argv', [path, *args]), \
      contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      runpy.run_path(path, run_name='__main__')
      status = 0
    except SystemExit as e:
      status = e.code
      if status is None:
        status = 0
      elif not isinstance(status, int):  # sys.exit('message')
        print(status, file=err)
        status = 1
  return status, out.getvalue(), err.getvalue()
