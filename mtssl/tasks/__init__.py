"""Self-supervised tasks. Importing this package registers every task."""

from mtssl.tasks.base import (Task, TaskConfig, get_task_class, make_task,
                              register, task_names)
# Importing a task module registers it.
from mtssl.tasks import ex  # pylint: disable=g-bad-import-order
from mtssl.tasks import rp

__all__ = ['Task', 'TaskConfig', 'get_task_class', 'make_task', 'register',
           'task_names']
