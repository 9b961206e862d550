"""Orthogonal finetuning: layers, injection, merging, COFT projection, state dicts, composition."""

from .cayley import cayley, project_generator, skew_from_triangle
from .compose import COMPOSE_MODES, compose_rotations, geodesic_mean, rotation_log, rotation_power
from .energy import count_parameters, hyperspherical_energy, oft_parameter_count
from .layer import (
    DEFAULT_TARGETS,
    OFTConfig,
    OFTConv2d,
    OFTLayer,
    OFTLinear,
    compose_oft,
    inject_oft,
    load_oft_state_dict,
    matches_target,
    oft_layers,
    oft_state_dict,
    project_coft,
    set_oft_enabled,
    target_modules,
)

__all__ = [
    "COMPOSE_MODES", "compose_oft", "compose_rotations", "geodesic_mean", "rotation_log", "rotation_power",
    "DEFAULT_TARGETS", "OFTConfig", "OFTConv2d", "OFTLayer", "OFTLinear", "cayley", "count_parameters",
    "hyperspherical_energy", "inject_oft", "load_oft_state_dict", "matches_target", "oft_layers",
    "oft_parameter_count", "oft_state_dict", "project_coft", "project_generator", "set_oft_enabled",
    "skew_from_triangle", "target_modules",
]
