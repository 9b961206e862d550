"""Will a training run fit on a card? `python plan.py experiment=<name> [method=...] [overrides]`.

Composes train.py's config, builds the run's networks on the meta device (shapes without
storage: no download, no weights, seconds), adapts the UNet with the method and runs one
training forward there, counting the tensors that forward saves for backward. Memory, in the
run's precision (trainer.precision):

    frozen weights     UNet, VAE, text encoder (the precision's weight dtype)
    trainable          the UNet adapter and the control network, with their gradients and AdamW's
                       two states (float32 unless the precision is "-true" half)
    activations        what one training forward saves for backward (parameters excluded), plus,
                       under mixed precision, the half copies of the frozen weights autocast makes
                       and saves; with model.gradient_checkpointing only the checkpoints' inputs
    VAE encode         the largest input + output of one VAE encoder module (no grad; each step
                       encodes its batch unless latents are cached), transient

peak = weights + trainable + max(activations, VAE encode); a card fits the run when
1.1 x peak + 1 GB (CUDA context, allocator fragmentation) is at most its memory. Approximate:
the meta forward cannot see tensors that share storage (it counts them twice) nor the
allocator's rounding; `measured_peak` measures a real step to check it against (tests/test_plan.py
on CPU, benchmarks/bench_plan.py on a GPU).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile
from transformers import CLIPTextConfig, CLIPTextModel

from orthodiff.data.control import condition_channels
from orthodiff.models.adapters import adapt_unet
from orthodiff.models.base import resolve_pretrained
from orthodiff.models.control_networks import ControlInjector, build_control_network

ROOT = Path(__file__).resolve().parents[3]
CARDS_GB = (24, 40, 80)
GB = 2**30
# trainer.precision -> (bytes per frozen weight, bytes per activation, autocast copies the weights)
PRECISIONS = {"32": (4, 4, False), "32-true": (4, 4, False), "64-true": (8, 8, False),
              "16-mixed": (4, 2, True), "bf16-mixed": (4, 2, True), "16-true": (2, 2, False),
              "bf16-true": (2, 2, False)}


@dataclass
class Plan:
    rows: dict[str, float]  # GB by what holds it
    parameters: dict[str, int]

    @property
    def peak_gb(self) -> float:
        r = self.rows
        return (r["frozen weights"] + r["trainable weights"] + r["gradients"] + r["optimizer state"]
                + max(r["activations"] + r["backward working set"], r["VAE encode (transient)"]))

    def fits(self, card_gb: float) -> bool:
        return 1.1 * self.peak_gb + 1.0 <= card_gb

    def text(self) -> str:
        lines = [f"{name:<26}{gb:8.2f} GB" for name, gb in self.rows.items()]
        lines += [f"{'peak':<26}{self.peak_gb:8.2f} GB", ""]
        lines += [f"{name:<26}{count / 1e6:8.2f} M" for name, count in self.parameters.items()]
        lines += [""] + [f"{card} GB card: {'fits' if self.fits(card) else 'does not fit'}" for card in CARDS_GB]
        return "\n".join(lines)


def architecture(model: DictConfig) -> tuple[dict, dict, dict]:
    """(UNet, VAE, text encoder) configs: the local pipeline folder's, else model.architecture's files."""
    source = Path(resolve_pretrained(model.pretrained))
    if (source / "model_index.json").is_file():
        files = {part: source / part / "config.json" for part in ("unet", "vae", "text_encoder")}
    elif model.get("architecture"):
        files = {part: ROOT / model.architecture[part] for part in ("unet", "vae", "text_encoder")}
    else:
        raise ValueError(f"plan.py: model.pretrained={model.pretrained!r} is no local pipeline folder and the model "
                         "config has no `architecture` (unet/vae/text_encoder config files, as conf/model/sd15.yaml)")
    configs = [json.loads(files[part].read_text()) for part in ("unet", "vae", "text_encoder")]
    configs[2] = {k: v for k, v in configs[2].items() if k in CLIPTextConfig().to_dict()}
    return tuple(configs)


class FusedAttention(torch.autograd.Function):
    """The shapes of a fused attention kernel (flash / memory-efficient, torch's choice on GPU and
    CPU alike): it saves q, k, v, its output and one float32 log-sum-exp per query for backward,
    never the (L x S) attention matrix, which the meta device's math path would save instead."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("plan.py only counts a forward")


@contextmanager
def fused_attention():
    """torch's scaled_dot_product_attention as FusedAttention's shapes, while planning."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda query, key, value, *args, **kwargs: FusedAttention.apply(query, key, value)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def count(module: nn.Module | None, trainable: bool | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def saved_bytes(run, units: list[nn.Module] = ()) -> tuple[int, int]:
    """(bytes of the tensors `run()` saves for backward, the most any one of `units` saves).
    Parameters (counted as weights) are left out, and tensors sharing storage count once."""
    storages, total, unit_peak, entered = set(), 0, 0, []

    def keep(tensor):
        nonlocal total
        storage = tensor.untyped_storage()._cdata
        if not isinstance(tensor, nn.Parameter) and not isinstance(tensor._base, nn.Parameter) and storage not in storages:
            storages.add(storage)
            total += tensor.untyped_storage().nbytes()
        return tensor

    def enter(*_):
        entered.append(total)

    def leave(*_):
        nonlocal unit_peak
        unit_peak = max(unit_peak, total - entered.pop())

    handles = [h for u in units for h in (u.register_forward_pre_hook(enter), u.register_forward_hook(leave))]
    try:
        with saved_tensors_hooks(keep, lambda tensor: tensor):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total, unit_peak


def checkpoint_units(net: nn.Module) -> list[nn.Module]:
    """What diffusers checkpoints one at a time: each ResNet block and each transformer."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [m for m in net.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]


def largest_step(module: nn.Module, run) -> int:
    """The largest input + output bytes of any leaf module during `run()` (a no-grad forward's
    transient peak, roughly)."""
    largest = 0

    def hook(_, inputs, output):
        nonlocal largest
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        largest = max(largest, sum(t.numel() * t.element_size() for t in tensors))

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return largest


def plan(cfg: DictConfig) -> Plan:
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ValueError(f"plan.py: trainer.precision={precision!r}; known: {', '.join(PRECISIONS)}")
    weight_bytes, activation_bytes, autocast_copies = PRECISIONS[precision]
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[activation_bytes]
    unet_config, vae_config, text_config = architecture(cfg.model)
    batch, resolution = cfg.data.batch_size, cfg.model.resolution
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        network = build_control_network(cfg.method.control_network, unet, condition_channels(cfg.control.name), factor)
        adapt_unet(unet, instantiate(cfg.adapter) if cfg.get("adapter") else None)
    frozen = count(unet, trainable=False) + count(vae) + count(text_encoder)
    trainable = count(unet, trainable=True) + count(network)
    trainable_bytes = 2 if precision.endswith("true") and weight_bytes == 2 else 4
    unet.to(dtype)
    network.to(dtype)
    size = resolution // factor
    latents = torch.randn(batch, unet.config.in_channels, size, size, device="meta", dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device="meta")
    text = torch.randn(batch, text_config.get("max_position_embeddings", 77), unet.config.cross_attention_dim,
                       device="meta", dtype=dtype)
    condition = torch.randn(batch, condition_channels(cfg.control.name), resolution, resolution, device="meta",
                            dtype=dtype)
    injector = ControlInjector(unet, network)

    def training_forward():
        with injector.control(condition):
            unet(latents, timesteps, encoder_hidden_states=text)

    with fused_attention():
        activations, largest_unit = saved_bytes(training_forward, checkpoint_units(unet) + checkpoint_units(network))
        if cfg.model.get("gradient_checkpointing"):  # the forward keeps the units' inputs; backward recomputes one
            for net in (unet, network):
                if getattr(net, "_supports_gradient_checkpointing", False):
                    net.enable_gradient_checkpointing()
            activations, _ = saved_bytes(training_forward)
    injector.remove()
    if autocast_copies and not cfg.model.get("gradient_checkpointing"):
        # autocast's half copies of the frozen weights, saved for backward (checkpointed blocks recompute theirs)
        activations += count(unet, trainable=False) * activation_bytes
    vae.to(dtype)
    image = torch.randn(batch, 3, resolution, resolution, device="meta", dtype=dtype)
    encode = 0 if cfg.model.get("cache_latents") else largest_step(vae.encoder, lambda: vae.encoder(image))
    rows = {"frozen weights": frozen * weight_bytes / GB, "trainable weights": trainable * trainable_bytes / GB,
            "gradients": trainable * trainable_bytes / GB, "optimizer state": 2 * trainable * 4 / GB,
            "activations": activations / GB, "backward working set": largest_unit / GB,
            "VAE encode (transient)": encode / GB}
    parameters = {"frozen parameters": frozen, "UNet adapter parameters": count(unet, trainable=True),
                  "control network parameters": count(network)}
    return Plan(rows, parameters)


def measured_peak(cfg: DictConfig, device: str = "cpu") -> int:
    """The peak bytes of live tensors in one steady-state training step of the real task (the
    second step: AdamW's state exists and cached latents are cached, as in a long run): the
    task's training_step under the run's precision, backward, the AdamW step and after_step.
    On CUDA, torch.cuda.max_memory_allocated; on CPU, which keeps no such count, the storages
    alive when the step starts (weights, optimizer state, caches) plus the peak of torch's
    allocation records over the step (the profiler's memory events, summed in time order)."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])  # None: full precision
    module = instantiate(cfg.module).to(device)
    if precision.endswith("-true") and dtype is not None:
        module.to(dtype)
    optimizer = module.configure_optimizers()
    size, batch_size = cfg.model.resolution, cfg.data.batch_size
    batch = {"pixel_values": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1,
             "conditioning": torch.rand(batch_size, condition_channels(cfg.control.name), size, size, device=device),
             "text": ["a red circle"] * batch_size, "index": torch.arange(batch_size)}

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                            enabled=precision.endswith("-mixed")):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        module.after_step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    state = [*module.parameters(), *module.buffers(),
             *(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
    live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    allocated = peak = 0
    records = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    for event in sorted(records, key=lambda event: event.start_ns()):
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return sum(live.values()) + peak
