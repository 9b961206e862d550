"""Networks and what the methods train: the control encoder and the other control networks
(control_networks.py), the UNet adapters (adapters.py), token embeddings (embeddings.py),
DDIM sampling, base-model loading and the tiny SD. The Lightning modules that train them
are in orthodiff.tasks."""

from .adapters import FullFinetuneConfig, LoRAConfig
from .control_encoder import ControlEncoder
from .control_networks import ControlInjector

__all__ = ["ControlEncoder", "ControlInjector", "FullFinetuneConfig", "LoRAConfig"]
