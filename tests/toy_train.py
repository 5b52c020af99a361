"""`python -m mtssl.train` with the toy tasks registered (distributed tests).

The cluster tests start every process (coordinator, parameter server,
workers) with this module: they need the toy tasks in the task registry
before `mtssl.train` generates its flags.
"""

from tests import toy_task

TOY_TASKS = ('toy_rp', 'toy_col')
for _name in TOY_TASKS:
  toy_task.toy_task_class(_name)

from mtssl import train  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  train.run()
