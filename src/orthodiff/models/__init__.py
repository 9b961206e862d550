"""Networks and what the methods train: the control encoder and the other control networks
(control_networks.py), the UNet adapters (adapters.py), the subject methods' embeddings
(embeddings.py: Textual Inversion, P+; perfusion.py; subject_encoder.py), DDIM sampling,
base-model loading and the tiny SD. The Lightning modules that train them are in
orthodiff.tasks."""

from .adapters import FullFinetuneConfig, LoRAConfig
from .control_encoder import ControlEncoder
from .control_networks import ControlInjector
from .embeddings import EMBEDDING_TYPES, Embedding, EmbeddingConfig, PPlusConfig, TextualInversionConfig
from .perfusion import PerfusionConfig  # imported here so that every embedding kind is registered
from .subject_encoder import SubjectEncoderConfig

__all__ = ["EMBEDDING_TYPES", "ControlEncoder", "ControlInjector", "Embedding", "EmbeddingConfig",
           "FullFinetuneConfig", "LoRAConfig", "PPlusConfig", "PerfusionConfig", "SubjectEncoderConfig",
           "TextualInversionConfig"]
