"""Atomic file-system writes: nothing written is ever left half-written.

Everything the project writes (converted checkpoints, exports, reports, shards)
goes to a temporary name in the destination's directory first and is renamed
into place only once complete, so an interrupted run leaves either the old
result or the new one, never a torn file.
"""

import contextlib
import json
import os
import shutil
import tempfile


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _default_mode(directory: bool) -> int:
  """The mode a plain open()/mkdir() would give (tempfile uses 0600/0700)."""
  return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
  """Yields a temporary directory that becomes `path` when the block succeeds.

  Raises FileExistsError up front when `path` exists and `overwrite` is False.
  On an exception the temporary directory is removed and `path` is untouched.
  """
  final = os.path.abspath(path)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f'{path} already exists; pass overwrite to replace '
                          f'it.')
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(final)}.tmp-', dir=parent)
  os.chmod(tmp, _default_mode(directory=True))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(final)}.old-', dir=parent)
    os.rmdir(old)
    os.rename(final, old)
  os.rename(tmp, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and an atomic rename."""
  final = os.path.abspath(path)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(final)}.tmp-',
                             dir=os.path.dirname(final))
  try:
    os.fchmod(fd, _default_mode(directory=False))
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, final)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def atomic_write_with(path: str, write, suffix: str = '') -> None:
  """Atomically writes `path` with a writer that opens the file itself.

  For tf.io.TFRecordWriter, cv2.VideoWriter and the like: `write(name)`
  writes a scratch file (its name ends with `suffix`, e.g. the extension a
  video writer picks its container from) in a private temporary directory;
  its bytes then go to `path` through `atomic_write_bytes`. If `write`
  raises, `path` is untouched.
  """
  with tempfile.TemporaryDirectory(prefix='mtssl-atomic-') as scratch:
    name = os.path.join(scratch, 'file' + suffix)
    write(name)
    with open(name, 'rb') as f:
      data = f.read()
  atomic_write_bytes(path, data)
