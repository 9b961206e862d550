"""What the subject methods learn on the text side, behind one interface, as the UNet
adapters are (models/adapters.py): an `EmbeddingConfig` per method and the `Embedding`
module it builds.

    config.kind                   the name (EMBEDDING_TYPES) and what adapter files record ("embedding")
    config.build(text_encoder, unet, token_id, init_id, task=None) -> Embedding
    config.metadata(embedding)    the adapter file's metadata strings; type(config).from_metadata(meta)
                                  reads them back, config.restore(embedding, meta) what the module keeps
    embedding.encode(input_ids)   what the UNet reads: an encoding, or a list whose first entry is the
                                  UNet's own argument (P+: one encoding per cross-attention layer)
    embedding.route(states)       the context in which the UNet reads the rest of such a list

and hooks with no-op defaults for what only some methods do: Perfusion's gate, its concept
mask in diffusers' pipeline and a second concept trained apart (models/perfusion.py), the
encoder method's word from images (models/subject_encoder.py). Callers never ask which kind
they hold. A new method is one config class (subclassing registers it; here, or beside its
module in a file models/__init__.py imports, so that adapter files find it) and one
conf/method/<name>.yaml with an `embedding:` node.

Textual Inversion and P+ are hooks that leave every network frozen and unchanged:

    ti = TokenEmbedding(text_encoder, token_id, init_id)       # Textual Inversion
    text = text_encoder(ids)[0]                                # rows of `token_id` use ti.vector

    pplus = PerLayerEmbedding(text_encoder, unet, token_id, init_id)   # P+
    contexts = pplus.encode(ids)                               # one text encoding per cross-attention layer
    with pplus.route(contexts):                                # each attn2 reads its own
        unet(latents, t, encoder_hidden_states=contexts[0])

The vectors start from the class word's embedding (Textual Inversion's usual
initialization), so training starts from "a <class>".
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

EMBEDDING_TYPES: dict[str, type[EmbeddingConfig]] = {}  # kind -> config class, filled by subclassing


class Embedding(nn.Module):
    """A subject method's text side, and the hooks callers use on any of them. This base is
    no learned embedding at all (the methods that finetune the UNet): the text encoder as
    it is, every hook a no-op or a refusal."""

    every_prompt = False  # Perfusion: edit every prompt, not only those naming the concept (the paper's code)

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = [text_encoder]  # a list: not a submodule (stays out of state_dict)

    def encode(self, input_ids: torch.Tensor):
        """What the UNet reads for `input_ids` (N, L)."""
        return self.text_encoder[0](input_ids)[0]

    def route(self, states):
        """The context in which the UNet's calls read `states` beyond their first entry (a
        list from `encode`, stacked like the UNet's batch; anything else: nothing to route)."""
        return contextlib.nullcontext()

    def prompt_context(self, input_ids: torch.Tensor | None):
        """The context for diffusers' pipeline's UNet calls over prompts `input_ids`, stacked
        as its batch ([negative; prompt] with guidance); None when it was given prompt_embeds."""
        return contextlib.nullcontext()

    def gate(self, beta: float | None = None, tau: float | None = None):
        """The inference gate (Perfusion's beta, tau) for the calls inside; None keeps a value."""
        if beta is None and tau is None:
            return contextlib.nullcontext()
        raise ValueError("beta/tau set Perfusion's gate; this adapter's embedding has none")

    def gate_settings(self) -> dict[str, float]:
        """The gate's current values ({}: no gate)."""
        return {}

    def from_images(self, images: list) -> torch.Tensor | None:
        """Set the learned vectors from the subject's uint8 images (H, W, 3) before training
        and return them; None: this embedding does not start from images."""
        return None

    def add_concept(self, concept, token_id: int, token: str) -> None:
        """A second concept trained apart joins this one for inference (`concept`: its
        orthodiff.adapter.AdapterFile, `token` its token, `token_id` that token's id)."""
        raise ValueError(f"{concept.path}: only Perfusion concepts combine at inference (this adapter's embedding "
                         "takes no second one); load a fresh pipeline for another adapter")

    def remove(self) -> None:
        """Take the hooks off the networks."""


class EmbeddingConfig:
    """A subject method's embedding: its kind, how it builds its Embedding, and what its
    adapter files record. Subclasses with a `kind` register themselves in EMBEDDING_TYPES
    (and as safe for Lightning's weights-only resume, which loads them from the hparams)."""

    kind: str
    every_prompt_variant = False  # has an `every_prompt` variant worth measuring (reproduce table=subject)
    unfoldable = ""  # "a <kind> adapter: why its effect cannot be folded into fixed weights" (export), if it cannot

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            EMBEDDING_TYPES[cls.kind] = cls
            torch.serialization.add_safe_globals([cls])

    def build(self, text_encoder: nn.Module, unet: nn.Module, token_id: int, init_id: int,
              task=None) -> Embedding:
        """The embedding for `token_id`, its vectors starting at `init_id`'s (the class word).
        `task` is the training task (None at inference), for what only training needs: its
        `tokenizer` and `typical_captions(n)` (Perfusion's C), `vae`, `model_digest()` and
        `hparams.pretrained` (the encoder method's image features and base-model check)."""
        raise NotImplementedError

    def metadata(self, embedding: Embedding) -> dict[str, str]:
        """The adapter file's metadata strings for this embedding ("embedding": the kind it is read as)."""
        return {"embedding": self.kind}

    @classmethod
    def from_metadata(cls, meta: dict) -> EmbeddingConfig:
        return cls()

    def restore(self, embedding: Embedding, meta: dict) -> None:
        """What a loaded embedding takes from its file's metadata besides the tensors."""


@dataclass
class TextualInversionConfig(EmbeddingConfig):
    """Textual Inversion: one learned input embedding for the token."""

    kind = "textual_inversion"

    def build(self, text_encoder, unet, token_id, init_id, task=None):
        return TokenEmbedding(text_encoder, token_id, init_id)


@dataclass
class PPlusConfig(EmbeddingConfig):
    """P+ (Extended Textual Inversion): one learned embedding per UNet cross-attention layer."""

    kind = "pplus"

    def build(self, text_encoder, unet, token_id, init_id, task=None):
        return PerLayerEmbedding(text_encoder, unet, token_id, init_id)


def embedding_config(value) -> EmbeddingConfig | None:
    """A task's `embedding` argument as a config: a config as it is, a registered kind's name
    with its defaults (`SubjectTask(embedding="pplus")`), None or "none" for no embedding."""
    if not isinstance(value, str):
        return value
    if value == "none":
        return None
    if value not in EMBEDDING_TYPES:
        raise ValueError(f"embedding={value!r}: choose from {['none', *sorted(EMBEDDING_TYPES)]}")
    return EMBEDDING_TYPES[value]()


def build_embedding(config: EmbeddingConfig | None, text_encoder, unet, token_id, init_id, task=None) -> Embedding:
    """config.build(...), or the no-op base for no embedding (config None)."""
    return Embedding(text_encoder) if config is None else config.build(text_encoder, unet, token_id, init_id, task)


def embedding_metadata(config: EmbeddingConfig | None, embedding: Embedding) -> dict[str, str]:
    return {"embedding": "none"} if config is None else config.metadata(embedding)


def embedding_from_metadata(meta: dict) -> EmbeddingConfig | None:
    """The config an adapter file's metadata names (None: a control adapter, or a subject one without embedding)."""
    kind = meta.get("embedding", "none")
    if kind == "none":
        return None
    if kind not in EMBEDDING_TYPES:
        raise ValueError(f"unknown embedding {kind!r}; known: {sorted(EMBEDDING_TYPES)}")
    return EMBEDDING_TYPES[kind].from_metadata(meta)


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules in the order data flows: down, mid, up
    (diffusers registers the mid block last)."""
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: order[n.split(".")[0]])


class TokenEmbedding(Embedding):
    """One learned input embedding for `token_id`, swapped in by a forward hook on the
    text encoder's token embedding table (which stays frozen)."""

    def __init__(self, text_encoder: nn.Module, token_id: int, init_id: int, count: int = 1):
        super().__init__(text_encoder)
        table = text_encoder.get_input_embeddings()
        self.token_id = token_id
        self.vectors = nn.Parameter(table.weight[init_id].detach().clone().float().repeat(count, 1))
        self.active = 0  # which vector the hook swaps in (P+ switches between them)
        self.rows: torch.Tensor | None = None  # (N, D): one vector per prompt instead (per_row)
        self.handle = table.register_forward_hook(self._swap)

    def _swap(self, module, inputs, output):
        mask = (inputs[0] == self.token_id).unsqueeze(-1)
        if not mask.any():
            return output
        vector = self.vectors[self.active] if self.rows is None else self.rows[:, None, :]
        return torch.where(mask, vector.to(output.dtype), output)

    @contextmanager
    def per_row(self, vectors: torch.Tensor):
        """Prompt i's token reads vectors[i] inside (a subject encoder's output, one per image)."""
        self.rows = vectors
        try:
            yield
        finally:
            self.rows = None

    def remove(self):
        self.handle.remove()


class PerLayerEmbedding(Embedding):
    """P+: one learned vector per UNet cross-attention layer. `encode` runs the text
    encoder once per layer; `route` makes each attn2 read its own encoding."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, token_id: int, init_id: int):
        super().__init__(text_encoder)
        self.layers = cross_attention_layers(unet)
        self.token = TokenEmbedding(text_encoder, token_id, init_id, count=len(self.layers))
        self.contexts = None
        self.handles = [unet.get_submodule(name).register_forward_pre_hook(self._hook(k), with_kwargs=True)
                        for k, name in enumerate(self.layers)]

    def encode(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        contexts = []
        for k in range(len(self.layers)):
            self.token.active = k
            contexts.append(self.text_encoder[0](input_ids)[0])
        self.token.active = 0
        return contexts

    def _hook(self, k: int):
        def swap(module, args, kwargs):
            if self.contexts is None:
                return None
            context = self.contexts[k]
            batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
            if context.shape[0] != batch:  # classifier-free guidance stacks [uncond; cond]
                raise ValueError(f"P+ context batch {context.shape[0]} != attention batch {batch}: "
                                 "encode the stacked prompts")
            return args, {**kwargs, "encoder_hidden_states": context}
        return swap

    @contextmanager
    def route(self, contexts: list[torch.Tensor] | None):
        self.contexts = contexts
        try:
            yield
        finally:
            self.contexts = None

    def prompt_context(self, input_ids):
        raise ValueError("this is a P+ adapter (one text encoding per cross-attention layer), which diffusers' "
                         "pipeline cannot feed: sample it with generate.py or OrthodiffPipeline.generate")

    def remove(self):
        self.token.remove()
        for handle in self.handles:
            handle.remove()
