"""Networks: the control encoder, the Lightning module, base-model loading, the tiny SD."""

from .control_encoder import ControlEncoder, ControlInjector
from .control_module import ControlModule

__all__ = ["ControlEncoder", "ControlInjector", "ControlModule"]
