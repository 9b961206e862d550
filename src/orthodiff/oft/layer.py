"""OFT layers: wrap a frozen nn.Linear / nn.Conv2d, inject, merge, save.

A wrapped layer keeps the frozen module as `base_layer` and its only trainable
tensor as `oft_generator`, so "save only what was trained" is a key filter.
Effective weight W' = W R with R = diag(R_1, ..., R_r) orthogonal (see cayley.py).
Each layer merges and unmerges itself; a whole model's adapter layers (OFT or LoRA) are
merged by orthodiff.models.adapters.merge_adapter / unmerge_adapter.
"""

import difflib
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .cayley import cayley, project_generator, project_generator_norm, skew_from_triangle
from .compose import COMPOSE_MODES, compose_rotations, inverse_cayley, triangle_from_skew

# Stable Diffusion's attention projections (self and cross) and GEGLU input projection.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")
ADAPTER_PREFIX = "oft_"


# COFT's two conventions for eps (OFTConfig.coft_norm): what each one bounds.
COFT_NORMS = {"rotation": "||R_i - I||_F <= eps", "paper": "||Q_i||_F <= eps * b^2 / sqrt(r), the OFT paper's code"}


@dataclass
class OFTConfig:
    """How to adapt a model. Set block_size or num_blocks (r = in_features / b).

    With neither set, num_blocks=4, the paper's reference for controllable generation.
    With coft=True every block is projected after each step, in one of two conventions
    (they are not the same method; every eps must say which it is in):
    - coft_norm="rotation" (default, this project's): the exact bound ||R_i - I||_F <= eps;
    - coft_norm="paper" (the OFT paper's code): ||Q_i||_F <= eps * b^2 / sqrt(r) on the full
      skew generator (b block size, r blocks; eps * b^2 with block sharing). Near the
      identity ||R_i - I||_F ~ 2 ||Q_i||_F, so at the same eps it is far looser (for SD 1.5,
      r=4, eps=1e-3: radius 3.2 / 12.8 / 51 on the 320/640/1280-wide layers).
    dropout is the probability of replacing a block's rotation by the identity during training.
    Targets follow PEFT: a module matches when its full name equals a target or ends
    with "." + target; a target written "re:<pattern>" is a regex matched in full.
    """

    block_size: int | None = None
    num_blocks: int | None = None
    coft: bool = False
    eps: float = 1e-3
    coft_norm: str = "rotation"
    block_share: bool = False
    cayley: str = "exact"
    neumann_terms: int = 5
    dropout: float = 0.0
    targets: list[str] | None = None  # None: DEFAULT_TARGETS

    def __post_init__(self):
        if self.block_size is not None and self.num_blocks is not None:
            raise ValueError(
                f"OFTConfig: set block_size ({self.block_size}) or num_blocks ({self.num_blocks}), not both"
            )
        if self.block_size is None and self.num_blocks is None:
            self.num_blocks = 4
        if self.coft_norm not in COFT_NORMS:
            raise ValueError(f"OFTConfig.coft_norm={self.coft_norm!r}: use 'rotation' ({COFT_NORMS['rotation']}) or "
                             f"'paper' ({COFT_NORMS['paper']})")
        if self.cayley not in ("exact", "neumann"):
            raise ValueError(f"OFTConfig.cayley={self.cayley!r}: use 'exact' or 'neumann'")
        if self.cayley == "neumann" and self.neumann_terms < 2:
            raise ValueError(f"OFTConfig.neumann_terms={self.neumann_terms}: use at least 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"OFTConfig.dropout={self.dropout}: must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"OFTConfig.eps={self.eps}: must be positive")
        self.targets = list(DEFAULT_TARGETS if self.targets is None else self.targets)  # plain list: JSON, pickle

    # The UNet-adapter interface every method's config shares (orthodiff.models.adapters).
    kind = "oft"

    def inject(self, model: nn.Module) -> None:
        inject_oft(model, self)

    def after_step(self, model: nn.Module) -> None:
        if self.coft:
            project_coft(model)  # COFT: back inside the eps-ball after every optimizer step

    @staticmethod
    def compose(model: nn.Module, parts: list, scales, mode: str = "product") -> tuple["OFTConfig", dict]:
        return compose_oft(model, parts, scales, mode)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_layout(in_features: int, config: OFTConfig, name: str = "layer") -> tuple[int, int]:
    """(num_blocks, block_size) for a layer; a ValueError names the valid choices."""
    if config.block_size is not None:
        b = config.block_size
        if b < 1 or in_features % b:
            raise ValueError(
                f"OFT block_size={b} does not divide the input size {in_features} of {name}; "
                f"valid block sizes: {_divisors(in_features)}"
            )
        return in_features // b, b
    r = config.num_blocks
    if r < 1 or in_features % r:
        raise ValueError(
            f"OFT num_blocks={r} does not divide the input size {in_features} of {name}; "
            f"valid block counts: {_divisors(in_features)}"
        )
    return r, in_features // r


def blockwise_matmul(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """rows @ diag(blocks): block i of every row (M, r*b) times blocks[i] (b, b).

    One batched matmul over the r blocks; the dense block-diagonal matrix is never
    built. Without autograd it writes through a transposed `out`, saving the copy
    back to (M, r*b) layout.
    """
    r, b, _ = blocks.shape
    blocks_first = rows.view(-1, r, b).transpose(0, 1)
    blocks = blocks.to(rows.dtype)
    if torch.is_grad_enabled() and (rows.requires_grad or blocks.requires_grad):
        return torch.bmm(blocks_first, blocks).transpose(0, 1).reshape(rows.shape)
    out = rows.new_empty(rows.shape[0], r, b)
    torch.bmm(blocks_first, blocks, out=out.transpose(0, 1))
    return out.view(rows.shape)


class OFTLayer(nn.Module):
    """Frozen base layer + orthogonal rotation of its input space.

    Subclasses say how the rotation meets the layer: OFTLinear rotates the input
    (input-centric, no dense matrix), OFTConv2d rotates the filters.
    """

    def __init__(self, base_layer: nn.Module, in_features: int, config: OFTConfig, name: str = "layer"):
        super().__init__()
        self.base_layer = base_layer
        self.num_blocks, self.block_size = block_layout(in_features, config, name)
        self.coft, self.eps, self.coft_norm = config.coft, config.eps, config.coft_norm
        self.block_share = config.block_share
        self.neumann_terms = config.neumann_terms if config.cayley == "neumann" else None
        self.dropout = config.dropout
        stored_blocks = 1 if config.block_share else self.num_blocks
        b = self.block_size
        # Zero generator = identity rotation = the base model exactly.
        self.oft_generator = nn.Parameter(torch.zeros(stored_blocks, b * (b - 1) // 2))
        self.merged = False
        self.disabled = False
        self._cache = {}  # name -> (key, tensor): rotation() and rotated_weight() without a graph

    def rotation(self, with_dropout: bool = False) -> torch.Tensor:
        """The (r, b, b) float32 blocks R_i, shared blocks expanded.

        Without a graph to build (sampling, evaluation, a frozen adapter) the rotation is
        computed once and reused until the generator changes: an optimizer step, a loaded
        state dict or a projection bumps the generator's version counter (all are in-place),
        and a move or cast gives it new storage, either of which misses the cache."""
        dropout = with_dropout and self.dropout > 0
        if dropout or self.builds_graph():
            return self._compute_rotation(dropout)
        return self._reused("rotation", self._generator_key(), lambda: self._compute_rotation(False))

    def builds_graph(self) -> bool:
        return torch.is_grad_enabled() and self.oft_generator.requires_grad

    def _generator_key(self) -> tuple:
        generator = self.oft_generator
        return generator._version, generator.data_ptr(), generator.device, generator.dtype, self.neumann_terms

    def _reused(self, name: str, key: tuple, compute):
        """compute(), kept under `name` and returned again while `key` stays the same."""
        cached = self._cache.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._cache[name] = (key, compute())
        return cached[1]

    def rotated_weight(self) -> torch.Tensor:
        """W R in the base weight's layout and dtype, reused while neither changes: without a graph
        to build, the layer costs what a merged one does (one more weight in memory)."""
        weight = self.base_layer.weight
        key = (self._generator_key(), weight._version, weight.data_ptr(), weight.dtype)
        return self._reused("weight", key, lambda: self._rotate_weight(weight, self.rotation()).to(weight.dtype))

    def _compute_rotation(self, with_dropout: bool) -> torch.Tensor:
        q = skew_from_triangle(self.oft_generator, self.block_size)  # cayley() upcasts
        r = cayley(q, self.neumann_terms).expand(self.num_blocks, -1, -1)
        if with_dropout:
            keep = torch.rand(self.num_blocks, 1, 1, device=r.device) >= self.dropout
            r = torch.where(keep, r, torch.eye(self.block_size, device=r.device))
        return r

    @torch.no_grad()
    def project(self):
        """COFT: pull every block back into its eps-ball (OFTConfig.coft_norm says which). No-op
        for plain OFT. In place, so a cached rotation sees the change (rotation())."""
        if not self.coft:
            return
        if self.coft_norm == "rotation":
            projected = project_generator(self.oft_generator, self.block_size, self.eps)
        else:
            projected = project_generator_norm(self.oft_generator, self.block_size, self.paper_radius)
        if projected is not self.oft_generator:
            self.oft_generator.copy_(projected)

    @property
    def paper_radius(self) -> float:
        """The OFT paper code's COFT radius on ||Q_i||_F: eps * b^2 / sqrt(r) (eps * b^2 shared)."""
        radius = self.eps * self.block_size**2
        return radius if self.block_share else radius / self.num_blocks**0.5

    def forward(self, x, *args, **kwargs):
        if self.disabled:
            if self.merged:
                raise RuntimeError("unmerge_adapter(model) before disabling a merged OFT layer")
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, self.rotation(with_dropout=self.training))

    def _rotate_weight(self, weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """W R blockwise on the flattened (out, in_features) weight, in R's float32/64."""
        return blockwise_matmul(weight.reshape(weight.shape[0], -1).to(rotation.dtype), rotation).view(weight.shape)

    @torch.no_grad()
    def _fold_into_weight(self, rotation: torch.Tensor, merged: bool):
        w = self.base_layer.weight
        w.copy_(self._rotate_weight(w, rotation).to(w.dtype))
        self.merged = merged

    def merge(self):
        if not self.merged:
            self._fold_into_weight(self.rotation(), merged=True)

    def unmerge(self):
        # R is orthogonal, so its inverse is its transpose: no solve, no drift.
        if self.merged:
            self._fold_into_weight(self.rotation().mT, merged=False)


def block_products(a: torch.Tensor, rows: torch.Tensor, r: int, b: int) -> torch.Tensor:
    """(r, b, b): a_i^T x_i for each block i of the (M, r*b) rows of a and x, summed over rows."""
    return torch.bmm(a.view(-1, r, b).permute(1, 2, 0), rows.view(-1, r, b).to(a.dtype).transpose(0, 1))


class _OFTLinearFunction(torch.autograd.Function):
    """y = W R x + bias with a hand-written backward.

    Forward rotates whichever is smaller: the input rows (input-centric, M <= out) or
    the weight (out x in, cheaper when there are more rows than output features, as
    in a UNet's self-attention). Backward does not form the frozen weight's gradient
    (autograd through W R would, a full extra GEMM). With h = g W:
    - input rotated: dx = h R and dR_i = h_i^T x_i, both blockwise;
    - weight rotated, R orthogonal (exact Cayley): dx = g (W R), the frozen layer's own
      GEMM on the rotated weight, and since h_i = dx_i R_i^T, dR_i = R_i (dx_i^T x_i): one
      blockwise product fewer than the first way. A Cayley-Neumann R is orthogonal only
      to O(||Q||^k), so it keeps the first way.
    """

    @staticmethod
    def forward(ctx, x, rotation, weight, bias, orthogonal):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, rotation, weight)
        ctx.weight_rotated = rows.shape[0] > weight.shape[0]
        ctx.orthogonal = orthogonal
        if ctx.weight_rotated:
            y = F.linear(rows, blockwise_matmul(weight, rotation).to(rows.dtype), bias)
        else:
            y = F.linear(blockwise_matmul(rows, rotation.mT), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, rotation, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        r, b, _ = rotation.shape
        grad_x = grad_rotation = grad_weight = grad_bias = None
        wants_x, wants_rotation = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.weight_rotated and ctx.orthogonal:
            # W R again rather than kept from forward: out x in x b FLOPs, fewer than the M x in x b saved.
            dx = g @ blockwise_matmul(weight, rotation).to(g.dtype)
            if wants_rotation:
                grad_rotation = rotation @ block_products(dx, rows, r, b).to(rotation.dtype)
            if wants_x:
                grad_x = dx.view(*grad.shape[:-1], r * b)
        elif wants_x or wants_rotation:
            h = g @ weight.to(g.dtype)  # the frozen layer's own input gradient, W^T g
            if wants_x:
                grad_x = blockwise_matmul(h, rotation).view(*grad.shape[:-1], r * b)
            if wants_rotation:
                grad_rotation = block_products(h, rows, r, b).to(rotation.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = (g.T @ blockwise_matmul(rows, rotation.mT).to(g.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0)
        return grad_x, grad_rotation, grad_weight, grad_bias, None


class OFTLinear(OFTLayer):
    def __init__(self, base_layer: nn.Linear, config: OFTConfig, name: str = "layer"):
        super().__init__(base_layer, base_layer.in_features, config, name)

    def adapted_forward(self, x, rotation):
        if not self.builds_graph() and not (self.training and self.dropout > 0):
            return F.linear(x, self.rotated_weight().to(x.dtype), self.base_layer.bias)
        return _OFTLinearFunction.apply(x, rotation, self.base_layer.weight, self.base_layer.bias,
                                        self.neumann_terms is None)


class OFTConv2d(OFTLayer):
    """Each filter is a vector in the (in_channels * kh * kw) space, rotated there.

    The rotation is applied to the filters (W' = W R), then the base layer's own
    stride, padding and dilation are used, so any kernel shape is exact and the
    identity at zero init (PEFT 0.21 is off by ~8 on a padded 3x3 conv).
    """

    def __init__(self, base_layer: nn.Conv2d, config: OFTConfig, name: str = "layer"):
        if base_layer.groups != 1:
            raise ValueError(f"OFT supports Conv2d with groups=1 only; {name} has groups={base_layer.groups}")
        in_features = base_layer.in_channels * base_layer.kernel_size[0] * base_layer.kernel_size[1]
        super().__init__(base_layer, in_features, config, name)

    def adapted_forward(self, x, rotation):
        if not self.builds_graph() and not (self.training and self.dropout > 0):
            weight = self.rotated_weight().to(x.dtype)
        else:
            weight = self._rotate_weight(self.base_layer.weight, rotation).to(x.dtype)
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)


_WRAPPERS = {nn.Linear: OFTLinear, nn.Conv2d: OFTConv2d}


def matches_target(name: str, target: str) -> bool:
    """PEFT's matching: the full name, or a name ending with "." + target; "re:<pattern>"
    matches the full name by regular expression."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def target_modules(model: nn.Module, targets) -> list[str]:
    """Names of `model`'s modules that any of `targets` matches, in module order."""
    return [name for name, _ in model.named_modules() if name and any(matches_target(name, t) for t in targets)]


def inject_oft(model: nn.Module, config: OFTConfig) -> list[str]:
    """Wrap every target nn.Linear / nn.Conv2d of `model` in place; freeze the rest.

    Returns the wrapped module names. Raises if a target matches nothing (listing
    similar names), if a matched module is of an unsupported type, or if the block
    layout does not fit a layer.
    """
    names = [n for n, _ in model.named_modules() if n]
    if any(isinstance(m, OFTLayer) for m in model.modules()):
        raise ValueError("model already has OFT layers; inject_oft once per model")
    for target in config.targets:
        if not any(matches_target(n, target) for n in names):
            suffixes = sorted({n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})
            similar = difflib.get_close_matches(target.removeprefix("re:"), suffixes, n=5, cutoff=0.5)
            raise ValueError(
                f"OFT target {target!r} matches no module of {type(model).__name__}; "
                f"similar module names: {similar or 'none'}"
            )
    matched = target_modules(model, config.targets)
    # Build every wrapper before touching the model, so a bad layer leaves it unchanged.
    wrappers = {}
    for name in matched:
        module = model.get_submodule(name)
        wrapper_cls = _WRAPPERS.get(type(module))
        if wrapper_cls is None:
            raise TypeError(
                f"OFT target {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d "
                f"are supported (narrow the targets)"
            )
        wrappers[name] = wrapper_cls(module, config, name)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, wrapper in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper.to(wrapper.base_layer.weight.device)
        setattr(parent, child, wrapper)
    return matched


def compose_oft(model: nn.Module, parts: list[tuple[OFTConfig, dict]], scales=None,
                mode: str = "product") -> tuple[OFTConfig, dict[str, torch.Tensor]]:
    """Several OFT adapters of the un-adapted `model`, each (config, its "<layer>.oft_generator"
    tensors), as one OFT adapter: per layer, the adapters' rotations composed (compose.py:
    "product" R_1^s_1 R_2^s_2 ..., the first adapter folded into W first, or the geodesic
    "mean"), stored as the composed rotation's exact Cayley generator. So the result is a
    plain OFT adapter (inject, cached rotation, merge, export all unchanged) on the union of
    the targets; a layer that one adapter leaves alone gets the identity from it. Layers
    that both adapt must share their block layout; errors name the layer and adapter."""
    if mode not in COMPOSE_MODES:
        raise ValueError(f"compose mode {mode!r}: choose one of {COMPOSE_MODES}")
    targets = list(dict.fromkeys(t for config, _ in parts for t in config.targets))
    composed = replace(parts[0][0], targets=targets, coft=False, block_share=False, cayley="exact", dropout=0.0)
    tensors, used = {}, [set() for _ in parts]
    for name in target_modules(model, targets):
        in_features = model.get_submodule(name).weight[0].numel()  # a filter's size for a conv (groups=1)
        r, b = block_layout(in_features, composed, name)
        key, rotations = f"{name}.{ADAPTER_PREFIX}generator", []
        for k, (config, generators) in enumerate(parts):
            if not any(matches_target(name, t) for t in config.targets):
                rotations.append(torch.eye(b, dtype=torch.float64).expand(r, b, b))
                continue
            own = block_layout(in_features, config, name)
            if own != (r, b):
                raise ValueError(f"layer {name}: {r} blocks of {b} in adapter 1's layout, {own[0]} of {own[1]} in "
                                 f"adapter {k + 1}'s: block layouts must agree to compose")
            if key not in generators:
                raise ValueError(f"adapter {k + 1} is missing {key}")
            expected = (1 if config.block_share else r, b * (b - 1) // 2)
            if tuple(generators[key].shape) != expected:
                raise ValueError(f"adapter {k + 1}: {key} has shape {tuple(generators[key].shape)}, expected {expected}")
            # The exact rotation, also for a Neumann adapter (whose R is that rotation's approximation,
            # orthogonal only to O(||Q||^k)): only rotations compose on the group.
            rotations.append(cayley(skew_from_triangle(generators[key].double(), b)).expand(r, b, b))
            used[k].add(key)
        rotation = compose_rotations(torch.stack(rotations), scales, mode)
        tensors[key] = triangle_from_skew(inverse_cayley(rotation)).float()
    for k, ((_, generators), seen) in enumerate(zip(parts, used)):
        if set(generators) - seen:
            raise ValueError(f"adapter {k + 1} has tensors for no target layer of this model: "
                             f"{sorted(set(generators) - seen)[:3]}")
    return composed, tensors


def oft_layers(model: nn.Module) -> list[OFTLayer]:
    return [m for m in model.modules() if isinstance(m, OFTLayer)]


def set_oft_enabled(model: nn.Module, enabled: bool):
    """Switch every OFT layer off (base model) or on, without removing it."""
    for layer in oft_layers(model):
        layer.disabled = not enabled


@torch.no_grad()
def project_coft(model: nn.Module):
    """Project every COFT layer into its eps-ball (OFTConfig.coft_norm). Call after each optimizer step."""
    for layer in oft_layers(model):
        layer.project()


def oft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (keys containing 'oft_'), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if ADAPTER_PREFIX in k.split(".")[-1]}


def load_oft_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]):
    """Load adapter tensors; the error names the first missing, unexpected or mis-shaped key."""
    expected = oft_state_dict(model)
    for key in state_dict:
        if key not in expected:
            raise KeyError(f"adapter key {key!r} has no OFT layer in this model "
                           f"(expected keys like {next(iter(expected), None)!r})")
    for key, tensor in expected.items():
        if key not in state_dict:
            raise KeyError(f"adapter is missing key {key!r}")
        if state_dict[key].shape != tensor.shape:
            raise ValueError(
                f"adapter key {key!r} has shape {tuple(state_dict[key].shape)}, the model expects "
                f"{tuple(tensor.shape)} (different block size or base model?)"
            )
    if any(layer.merged for layer in oft_layers(model)):
        raise RuntimeError("unmerge_adapter(model) before loading new adapter weights")
    model.load_state_dict(state_dict, strict=False)
