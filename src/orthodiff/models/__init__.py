"""Networks: the control encoder, the methods compared, the Lightning module, base-model
loading, the tiny SD."""

from .control_encoder import ControlEncoder
from .control_module import ControlModule
from .methods import ControlInjector, FullFinetuneConfig, LoRAConfig
from .subject_module import SubjectModule

__all__ = ["ControlEncoder", "ControlInjector", "ControlModule", "FullFinetuneConfig", "LoRAConfig", "SubjectModule"]
