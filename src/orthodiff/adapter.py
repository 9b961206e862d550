"""The trained adapter on disk: one safetensors file with the trainable tensors (the UNet
adapter's under "unet.…", the control network's under "control_network.…") and metadata
strings naming the format version, the method, the base model, a fingerprint of its
target layers' shapes and a signature of their weights (a few values per layer), the UNet
adapter config, the control network and its config, the control type, and the sampling settings it was validated with (optional).
The task (orthodiff.tasks) adds its own metadata: a control task its control type, network
and network config; a subject task (no control network) the token, the class word and the
learned embedding kind, with its learned token vectors stored under "embedding.…"
(the embedding's config writes its own metadata, models/embeddings.py; Perfusion: also i*,
C^-1 i*, i*_super and o*_V, its gate settings and C's digest).

Format versions: 1 (OFT + hint encoder only: "oft_config", "control_encoder.…" keys) is
read and converted; 2 is written.

Inference reads a file once into an `AdapterFile` (tensors, decoded metadata, the embedding
config) that generate.py, the pipeline, export and the demo pass along.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from orthodiff.data.subjects import check_token
from orthodiff.files import atomic_path
from orthodiff.models.adapters import adapt_unet, adapter_from_dict, adapter_to_dict, same_signature, target_fingerprint, target_signature
from orthodiff.models.control_networks import control_network_from_config
from orthodiff.models.embeddings import Embedding, EmbeddingConfig, build_embedding, embedding_from_metadata
from orthodiff.oft import DEFAULT_TARGETS

FORMAT = "orthodiff-adapter"
FORMAT_VERSION = 2


def save_adapter(path: str | Path, module) -> Path:
    """Write a task's (orthodiff.tasks) adapter atomically: a crash mid-write never
    replaces an existing file with a partial one."""
    path = Path(path)
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "method": str(module.hparams.method or ""),
        "base_model": str(module.hparams.pretrained),
        "target_fingerprint": module.target_fingerprint,
        "target_signature": json.dumps(module.target_signature),
        "adapter_config": json.dumps(adapter_to_dict(module.adapter_config)),
        # What it was validated with: generate.py's defaults (size: the side subject tasks draw at;
        # control tasks draw at their condition's size).
        "sampling": json.dumps({"steps": module.hparams.val_steps, "guidance": module.hparams.val_guidance,
                                "size": module.hparams.get("resolution")}),
        **module.adapter_metadata(),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.trainable_state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


@dataclass
class AdapterFile:
    """An adapter file read once: its tensors, its decoded metadata (format 2's keys, whatever
    the file's version; "adapter_config" an OFTConfig / LoRAConfig / FullFinetuneConfig or
    None) and the embedding config it names (None: a control adapter, or a subject adapter
    that trained the UNet)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict
    embedding: EmbeddingConfig | None

    @classmethod
    def read(cls, path: str | Path) -> AdapterFile:
        tensors, meta = read_adapter(path)
        return cls(Path(path), tensors, meta, embedding_from_metadata(meta))

    @classmethod
    def of(cls, source: str | Path | AdapterFile) -> AdapterFile:
        """`source` itself if it was read already, else the file it names, read."""
        return source if isinstance(source, AdapterFile) else cls.read(source)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and decoded metadata (format 2's keys, whatever the file's version; the
    "adapter_config" becomes an OFTConfig / LoRAConfig / FullFinetuneConfig or None).
    Errors say when a file is not an orthodiff adapter or needs a newer orthodiff.
    AdapterFile.read adds the embedding config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path} is not a safetensors file: {error}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an orthodiff adapter (metadata format={metadata.get('format')!r})")
    version = int(metadata.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} is adapter format version {version}; this orthodiff reads versions 1 to "
                         f"{FORMAT_VERSION}: upgrade orthodiff")
    decoded = dict(metadata)
    if version == 1:
        oft = json.loads(metadata["oft_config"])
        decoded["adapter_config"] = json.dumps(None if oft is None else {"type": "oft", **oft})
        decoded["method"] = "" if oft is None else ("coft" if oft["coft"] else "oft")
        decoded["control_network"] = "hint"
        decoded["control_network_config"] = metadata["control_encoder_config"]
        tensors = {("control_network." + k.removeprefix("control_encoder.") if k.startswith("control_encoder.") else k): v
                   for k, v in tensors.items()}
    decoded["adapter_config"] = adapter_from_dict(json.loads(decoded["adapter_config"]))
    decoded.setdefault("task", "control")  # written before subject adapters existed
    if decoded["task"] == "control":
        decoded["control_network_config"] = json.loads(decoded["control_network_config"])
    decoded["sampling"] = json.loads(decoded.get("sampling", "{}"))  # absent before this key existed
    return tensors, decoded


def check_base(path, meta: dict, fingerprint: str, signature: list, base_name: str,
               allow_other_base: bool = False) -> None:
    """The base model's target layers must be the adapter's: the same shapes (`fingerprint`),
    and the same weights (`signature`; files written before it existed skip this) unless
    `allow_other_base` (applying it to a finetuned derivative on purpose). Errors name both."""
    if meta["target_fingerprint"] and fingerprint != meta["target_fingerprint"]:
        raise ValueError(
            f"adapter {path} was trained on base model {meta['base_model']!r} (target-layer fingerprint "
            f"{meta['target_fingerprint']}); {base_name!r} has different target layers "
            f"(fingerprint {fingerprint}): pass the base model the adapter was made for")
    recorded = json.loads(meta.get("target_signature") or "null")
    if recorded is not None and not allow_other_base and not same_signature(recorded, signature):
        raise ValueError(
            f"adapter {path} was trained on base model {meta['base_model']!r}; {base_name!r} has target layers of "
            "the same shapes but other weights (a retrained or finetuned base, e.g. an older tiny SD): pass the "
            "base model the adapter was made for, or apply it to this one anyway (allow_other_base=True; "
            "generate.py allow_other_base=true)")


def check_tensors(path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter {path} does not fit its method's model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"adapter {path}: {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
        if not tensor.is_floating_point():  # float16/bfloat16 are cast on loading; integers are no weights
            raise ValueError(f"adapter {path}: {key} is {tensor.dtype}, the model expects floating point "
                             f"({expected[key].dtype})")


def load_adapter(path: str | Path | AdapterFile, pretrained: str | None = None, allow_other_base: bool = False,
                 **module_kwargs):
    """The task (orthodiff.tasks: a ControlTask with its control network, or a SubjectTask)
    rebuilt from an adapter file, frozen base + trained tensors, for training, evaluation or
    editing. `pretrained` replaces the base model named in the metadata; a base model whose
    target layers differ from the adapter's raises an error naming both (check_base). For
    inference (generate.py, export, the demo), see orthodiff.pipelines.OrthodiffPipeline:
    nothing there builds a task."""
    file = AdapterFile.of(path)
    path, tensors, meta = file.path, file.tensors, file.meta
    from orthodiff.tasks import TASKS  # here only: reading and attaching an adapter needs no Lightning

    if meta["task"] not in TASKS:
        raise ValueError(f"{path} is an adapter for task {meta['task']!r}; this orthodiff knows {sorted(TASKS)}")
    module = TASKS[meta["task"]].from_metadata(meta, pretrained=pretrained or meta["base_model"],
                                               adapter=meta["adapter_config"], method=meta["method"] or None,
                                               **module_kwargs)
    check_base(path, meta, module.target_fingerprint, module.target_signature, module.hparams.pretrained,
               allow_other_base)
    check_tensors(path, tensors, module.trainable_state_dict())
    module.load_state_dict(tensors, strict=False)
    return module.eval()


def attach_adapter(unet: nn.Module, path: str | Path | AdapterFile, base_name: str = "this base model",
                   allow_other_base: bool = False) -> tuple[nn.Module, dict]:
    """Adapt a plain diffusers `unet` in place with an adapter file; returns the control
    network (with its trained weights) and the adapter's metadata. The inference path:
    no Lightning module, no training state."""
    networks, metas = attach_adapters(unet, [path], base_name=base_name, allow_other_base=allow_other_base)
    return networks[0], metas[0]


def attach_adapters(unet: nn.Module, paths: list[str | Path | AdapterFile], scales=None, mode: str = "product",
                    base_name: str = "this base model", allow_other_base: bool = False) -> tuple[list[nn.Module], list[dict]]:
    """Adapt a plain diffusers `unet` in place with one or several controllable-generation
    adapters trained apart; returns their control networks (ControlInjector feeds them
    together, each with its scale) and metadata, in the order given. The UNet adapters compose
    into one of their kind (`type(config).compose`: OFT rotations multiplied in the order given,
    R_1^s_1 R_2^s_2, or their geodesic mean with mode="mean"; LoRA updates added), each adapter
    at its scale. Adapters for another base, UNet adapters of different kinds, or layers
    adapted in incompatible ways are refused in one line naming the files."""
    adapter_files = [AdapterFile.of(p) for p in paths]
    paths = [file.path for file in adapter_files]
    scales = [1.0] * len(paths) if scales is None else [float(s) for s in scales]
    if len(scales) != len(paths):
        raise ValueError(f"{len(scales)} scales for {len(paths)} adapters: give one per adapter")
    files = " and ".join(map(str, paths))
    refuse = (lambda error: ValueError(f"cannot compose {files}: {error}")) if len(paths) > 1 else (lambda error: error)
    adapters = []
    for path, tensors, meta in ((file.path, file.tensors, file.meta) for file in adapter_files):
        if meta["task"] != "control":
            raise ValueError(f"{path} is a {meta['task']}-driven adapter (token {meta.get('token')!r}), not a "
                             "controllable-generation one: load it with OrthodiffPipeline.load_adapter(path) and "
                             "sample with pipe(prompt) or pipe.generate(prompts)")
        targets = getattr(meta["adapter_config"], "targets", DEFAULT_TARGETS)
        try:  # before adapting: names change
            check_base(path, meta, target_fingerprint(unet, targets), target_signature(unet, targets), base_name,
                       allow_other_base)
        except ValueError as error:
            raise refuse(error) from None
        stray = sorted(k for k in tensors if not k.startswith(("unet.", "control_network.")))
        if stray:
            raise ValueError(f"adapter {path} does not fit its method's model: unexpected {stray[:3]}")
        adapters.append((path, tensors, meta))
    adapted = [(path, meta["adapter_config"], scale, {k.removeprefix("unet."): v for k, v in tensors.items()
                                                      if k.startswith("unet.")})
               for (path, tensors, meta), scale in zip(adapters, scales) if meta["adapter_config"] is not None]
    kinds = {config.kind for _, config, _, _ in adapted}
    if len(kinds) > 1:
        raise refuse(f"their UNet adapters are of different kinds ({', '.join(f'{p.name}: {c.kind}' for p, c, _, _ in adapted)}); "
                     "compose adapters of one kind (OFT/COFT with OFT/COFT, LoRA with LoRA)")
    config, unet_tensors = (adapted[0][1], {f"unet.{k}": v for k, v in adapted[0][3].items()}) if adapted else (None, {})
    if len(adapted) > 1 or (adapted and adapted[0][2] != 1):
        try:
            config, composed = type(config).compose(unet, [(c, t) for _, c, _, t in adapted],
                                                    [s for _, _, s, _ in adapted], mode)
        except ValueError as error:
            raise refuse(error) from None
        unet_tensors = {f"unet.{k}": v for k, v in composed.items()}
    adapt_unet(unet, config)
    parts = nn.ModuleDict({"unet": unet})
    trainable = {name for name, p in parts.named_parameters() if p.requires_grad}
    check_tensors(files, unet_tensors, {k: v for k, v in parts.state_dict().items() if k in trainable})
    parts.load_state_dict(unet_tensors, strict=False)
    unet.requires_grad_(False)
    networks = []
    for path, tensors, meta in adapters:
        network = control_network_from_config(meta["control_network"], meta["control_network_config"])
        own = {k: v for k, v in tensors.items() if k.startswith("control_network.")}
        check_tensors(path, own, {f"control_network.{k}": v for k, v in network.named_parameters()})
        network.load_state_dict({k.removeprefix("control_network."): v for k, v in own.items()}, strict=False)
        networks.append(network.requires_grad_(False).eval())
    return networks, [meta for _, _, meta in adapters]


def attach_subject_adapter(unet: nn.Module, text_encoder: nn.Module, tokenizer, path: str | Path | AdapterFile,
                           base_name: str = "this base model", token: str | None = None,
                           allow_other_base: bool = False) -> tuple[Embedding, dict]:
    """Adapt a plain diffusers `unet` and `text_encoder` in place with a subject adapter: its
    UNet adapter (OFT/LoRA/full) or its embedding (models/embeddings.py: Textual Inversion,
    method=encoder, P+, Perfusion's embedding and K/V edit). `token` replaces the adapter's
    token (two concepts trained with the same one). Returns the embedding (the no-op base
    for a UNet adapter) and the metadata."""
    file = AdapterFile.of(path)
    path, tensors, meta = file.path, file.tensors, file.meta
    if meta["task"] != "subject":
        raise ValueError(f"{path} is a {meta['task']} adapter, not a subject-driven one")
    targets = getattr(meta["adapter_config"], "targets", DEFAULT_TARGETS)
    # before adapting: names change
    check_base(path, meta, target_fingerprint(unet, targets), target_signature(unet, targets), base_name, allow_other_base)
    token_id = check_token(tokenizer, token or meta["token"])
    class_id = tokenizer(meta["class_word"], add_special_tokens=False).input_ids[-1]
    adapt_unet(unet, meta["adapter_config"])
    parts = nn.ModuleDict({"unet": unet, "embedding": build_embedding(file.embedding, text_encoder, unet, token_id,
                                                                      class_id)})
    trainable = {name for name, p in parts.named_parameters() if p.requires_grad}
    check_tensors(path, tensors, {k: v for k, v in parts.state_dict().items()
                                  if k in trainable or k.startswith("embedding.")})
    parts.load_state_dict(tensors, strict=False)
    parts.requires_grad_(False)
    if file.embedding is not None:
        file.embedding.restore(parts["embedding"], meta)
    return parts["embedding"].eval(), meta


def add_concept(embedding: Embedding, unet: nn.Module, tokenizer, path: str | Path | AdapterFile,
                token: str | None = None) -> dict:
    """A second concept, trained apart on the same base model, joins `embedding` (Perfusion's
    multi-concept inference; other embeddings refuse); `token` replaces its adapter's token
    when both were trained with the same one. Returns its metadata."""
    file = AdapterFile.of(path)
    check_base(file.path, file.meta, target_fingerprint(unet, DEFAULT_TARGETS),
               target_signature(unet, DEFAULT_TARGETS), "the first concept's base")
    token = token or file.meta["token"]
    embedding.add_concept(file, check_token(tokenizer, token), token)
    return file.meta
