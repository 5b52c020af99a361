"""Self-supervised tasks. Importing this package registers every task."""

from mtssl.tasks.base import (Task, TaskConfig, get_task_class, make_task,
                              register, task_names)
from mtssl.tasks import col  # pylint: disable=unused-import  # registers 'col'
from mtssl.tasks import ex  # pylint: disable=unused-import  # registers 'ex'
from mtssl.tasks import ms  # pylint: disable=unused-import  # registers 'ms'
from mtssl.tasks import rp  # pylint: disable=unused-import  # registers 'rp'
from mtssl.tasks import ti  # pylint: disable=unused-import  # registers 'ti'

__all__ = ['Task', 'TaskConfig', 'get_task_class', 'make_task', 'register',
           'task_names']
