"""Lightning modules: one DiffusionTask base (frozen SD, the method's adapter, training
step, sampling, validation, adapter metadata) and a task per kind of generation, each a
few hooks."""

from .base import DiffusionTask, NonFiniteLossError
from .control import ControlTask
from .subject import SubjectTask
from .subject_encoder import SubjectEncoderTask

TASKS = {task.task_name: task for task in (ControlTask, SubjectTask, SubjectEncoderTask)}

__all__ = ["TASKS", "ControlTask", "DiffusionTask", "NonFiniteLossError", "SubjectEncoderTask", "SubjectTask"]
