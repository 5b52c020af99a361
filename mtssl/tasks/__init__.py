"""Self-supervised tasks. Importing this package registers every task."""

from mtssl.tasks.base import (Task, TaskConfig, get_task_class, make_task,
                              register, task_names)

__all__ = ['Task', 'TaskConfig', 'get_task_class', 'make_task', 'register',
           'task_names']
