"""Serving many tasks from one frozen backbone: the mixed-task model and its HTTP server."""

from .multitask import TASK_NAME, MultiTaskModel, Task, check_task_name

__all__ = ["MultiTaskModel", "TASK_NAME", "Task", "check_task_name"]
