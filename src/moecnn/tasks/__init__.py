"""Tasks for the one training loop and evaluation entry (see :class:`moecnn.tasks.base.Task`):
``classification`` and ``detection``, registered in :data:`moecnn.registry.TASKS`."""
from . import classification, detection  # noqa: F401  (register the tasks)
from .base import Task

__all__ = ["Task"]
