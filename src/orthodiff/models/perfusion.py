"""Perfusion (Tewel et al., "Key-Locked Rank One Editing for Text-to-Image Personalization",
SIGGRAPH 2023): gated rank-one edits of every cross-attention K and V projection.

For one row e of a prompt's text encoding, an edited projection W (attn2.to_k, attn2.to_v)
gives

    sim = e^T C^-1 i*        E = i*^T C^-1 i*
    W e  ->  W e - (sim/E) W i* + sigmoid((sim/E - beta) / tau) o*

i* is the concept token's encoding (an EMA over training batches, decay 0.99), C the
uncentred covariance of text encodings over a large caption set (`text_covariance`): the
component of e along i* (in the C^-1 metric) is replaced by the concept's output o*,
behind a sigmoid gate that opens as e approaches i*. Keys are locked: o*_K = W_K i*_super,
the class word's key in the same context, never trained; o*_V (initialised to
W_V i*_super) and the concept's input embedding train, nothing else.

    perfusion = Perfusion(text_encoder, unet, token_id, class_id, PerfusionConfig())
    states = perfusion.encode(ids)        # [encoding (N, L, D), concept mask (N, K)]
    with perfusion.route(states):         # the edit applies to the prompts that name a concept
        unet(latents, t, encoder_hidden_states=states[0])

Only the prompts that contain a concept's token are edited; every other prompt (the
unconditional one included) goes through the base projections exactly. The paper's code
edits every prompt and relies on the gate alone; `every_prompt=True` does that (measured
in the README). An untrained concept (before its first training batch) edits nothing.

At inference nothing needs C: the adapter keeps C^-1 i* beside i*. A second concept
trained apart joins with `add_concept` (the paper's multi-concept case): e's component in
the span of both i* (C^-1 metric, Appendix B's projection written with their 2x2 Gram
matrix) is replaced by the two gated outputs.

PerfusionConfig is method=perfusion's embedding config (models/embeddings.py): it builds the
module, writes its settings and C's digest into the adapter file and reads them back.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from orthodiff.models.embeddings import Embedding, EmbeddingConfig, TokenEmbedding, cross_attention_layers

MAX_CONCEPTS = 2


@dataclass
class PerfusionConfig(EmbeddingConfig):
    """The gate (beta, tau) in training and at inference (the paper's 0.75 / 0.1 and
    0.7 / 0.15; inference's can be changed per call), the EMA decay of i*, and where C
    comes from: None for the task's typical captions (the shapes world's on the tiny SD),
    a .txt file of captions (one a line) or a .pt/.safetensors file holding C."""

    beta: float = 0.75
    tau: float = 0.1
    inference_beta: float = 0.7
    inference_tau: float = 0.15
    decay: float = 0.99
    covariance: str | None = None
    covariance_captions: int = 1000   # default captions used for C

    kind = "perfusion"
    every_prompt_variant = True
    unfoldable = ("a Perfusion adapter: its gated rank-one edit depends on the prompt (the gate reads each text "
                  "token's similarity to the concept), so it cannot be folded into fixed weights")

    def __post_init__(self):
        for name in ("tau", "inference_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PerfusionConfig.{name}={getattr(self, name)}: the gate's temperature must be > 0")
        if not 0 <= self.decay < 1:
            raise ValueError(f"PerfusionConfig.decay={self.decay}: must be in [0, 1)")

    def build(self, text_encoder, unet, token_id, init_id, task=None) -> "Perfusion":
        # C is needed for training only, at the first batch: from the task's tokenizer and captions.
        covariance = None if task is None else (
            lambda: self.covariance_matrix(text_encoder, task.tokenizer, task.typical_captions))
        return Perfusion(text_encoder, unet, token_id, init_id, self, covariance=covariance)

    def metadata(self, embedding: "Perfusion") -> dict[str, str]:
        return {"embedding": self.kind, "perfusion": json.dumps(asdict(self)),
                "covariance_digest": embedding.covariance_digest}

    @classmethod
    def from_metadata(cls, meta: dict) -> "PerfusionConfig":
        return cls(**json.loads(meta["perfusion"]))

    def restore(self, embedding: "Perfusion", meta: dict) -> None:
        embedding.covariance_digest = meta.get("covariance_digest", "")  # which C the concept was trained with

    def covariance_matrix(self, text_encoder, tokenizer, typical_captions) -> torch.Tensor:
        """C: from `covariance` (C itself in .pt/.safetensors, or a .txt of captions, one a
        line), else from `typical_captions(covariance_captions)` (the task's)."""
        if self.covariance is None:
            captions = typical_captions(self.covariance_captions)
        else:
            path = Path(self.covariance).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"covariance={self.covariance}: no such file (a .txt of captions, or C in "
                                        ".pt/.safetensors)")
            if path.suffix == ".txt":
                captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            elif path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))["covariance"]
            else:
                return torch.load(path, map_location="cpu", weights_only=True)
        return text_covariance(text_encoder, tokenizer, captions)


@torch.no_grad()
def text_covariance(text_encoder, tokenizer, captions: list[str], batch_size: int = 128) -> torch.Tensor:
    """C: the uncentred covariance (float64, D x D) of the text encodings the cross-attention
    projections read, every one of the tokenizer's max_length positions of every caption
    (padding included: the UNet reads those rows too)."""
    if not captions:
        raise ValueError("the covariance of text encodings needs at least one caption")
    device = next(text_encoder.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(list(captions[start:start + batch_size]), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        rows = text_encoder(ids)[0].reshape(-1, text_encoder.config.hidden_size).double()
        total = total + rows.T @ rows
        count += len(rows)
    return (total / count).cpu()


def inverse_covariance(covariance: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """C^-1 (float64, exactly symmetric). A ridge of `ridge` x the mean eigenvalue keeps it
    positive definite when the captions leave a direction (almost) unused: the final layer
    norm puts every encoding near one hyperplane."""
    covariance = covariance.double()
    size = covariance.shape[0]
    regularised = covariance + ridge * torch.trace(covariance) / size * torch.eye(size, dtype=torch.float64)
    inverse = torch.linalg.inv(regularised)
    return (inverse + inverse.T) / 2


def covariance_digest(covariance: torch.Tensor) -> str:
    """A short hash of C: two concepts combine only if they were trained with the same one."""
    return hashlib.sha256(covariance.double().contiguous().numpy().tobytes()).hexdigest()[:16]


class Perfusion(Embedding):
    """The trained concept (its token embedding, i*, C^-1 i*, i*_super and one o*_V per
    cross-attention layer) and the forward hooks that edit attn2.to_k / attn2.to_v.

    `covariance` (a callable returning C, or C) is needed for training only; it is asked for
    at the first training batch. The learned state is the parameters (embedding, o*_V) plus
    the persistent buffers (i*, C^-1 i*, i*_super, `initialised`)."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, token_id: int, class_id: int,
                 config: PerfusionConfig | None = None, covariance=None):
        super().__init__(text_encoder)
        self.config = config or PerfusionConfig()
        self.unet = [unet]  # a list: not a submodule (stays out of state_dict)
        self.token_id, self.class_id = token_id, class_id
        self.token = TokenEmbedding(text_encoder, token_id, class_id)
        self.layers = cross_attention_layers(unet)
        attentions = [unet.get_submodule(name) for name in self.layers]
        width = text_encoder.config.hidden_size
        self.register_buffer("concept_input", torch.zeros(width))    # i*
        self.register_buffer("concept_metric", torch.zeros(width))   # C^-1 i*
        self.register_buffer("class_input", torch.zeros(width))      # i*_super
        self.register_buffer("initialised", torch.zeros(()))  # 1 after the first training batch (floats only)
        self.values = nn.ParameterList([nn.Parameter(torch.zeros(a.to_v.out_features)) for a in attentions])
        self._covariance = covariance
        self.inverse_covariance: torch.Tensor | None = None  # float64, training only
        self.covariance_digest = ""
        self.beta, self.tau = self.config.inference_beta, self.config.inference_tau
        self.every_prompt = False
        self.extra: list[dict] = []   # concepts added for inference (add_concept)
        self.mask: torch.Tensor | None = None
        self._live_input: torch.Tensor | None = None   # i* with the current batch's gradient
        self.handles = [attention.to_k.register_forward_hook(self._hook(k, "key")) for k, attention in
                        enumerate(attentions)]
        self.handles += [attention.to_v.register_forward_hook(self._hook(k, "value")) for k, attention in
                         enumerate(attentions)]

    # --- text side ---------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        return [self.token_id] + [concept["token_id"] for concept in self.extra]

    def concept_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, K) bool: which prompts name which concept."""
        return torch.stack([(input_ids == token).any(1) for token in self.token_ids], 1)

    def encode(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """[the text encoding (N, L, D), the concept mask (N, K): which prompts name which
        concept]. In training mode also updates i* and i*_super from this batch."""
        text_encoder = self.text_encoder[0]
        states = text_encoder(input_ids)[0]
        mask = self.concept_mask(input_ids)
        if self.training and mask[:, 0].any():
            rows = mask[:, 0].nonzero()[:, 0]
            position = (input_ids[rows] == self.token_id).int().argmax(1)
            current = states[rows, position].float().mean(0)
            with torch.no_grad():
                as_class = input_ids[rows].masked_fill(input_ids[rows] == self.token_id, self.class_id)
                current_class = text_encoder(as_class)[0][torch.arange(len(rows)), position].float().mean(0)
            self._update(current.detach(), current_class)
            # i* is an EMA: its value is the buffer's, its gradient the current batch's (straight-through).
            self._live_input = self.concept_input + current - current.detach()
        return [states, mask]

    @torch.no_grad()
    def _update(self, current: torch.Tensor, current_class: torch.Tensor) -> None:
        if self.inverse_covariance is None:
            self.set_covariance(self._covariance() if callable(self._covariance) else self._covariance)
        if not self.initialised:
            self.concept_input.copy_(current)
            self.class_input.copy_(current_class)
            for value, attention in zip(self.values, self._attentions()):
                value.copy_(F.linear(current_class, attention.to_v.weight.float()))  # o*_V starts at W_V i*_super
            self.initialised.fill_(1.0)
        else:
            decay = self.config.decay
            self.concept_input.mul_(decay).add_((1 - decay) * current)
            self.class_input.mul_(decay).add_((1 - decay) * current_class)
        self.concept_metric.copy_((self.inverse_covariance @ self.concept_input.double()).float())

    def set_covariance(self, covariance: torch.Tensor) -> None:
        if covariance is None:
            raise ValueError("training Perfusion needs the covariance C of text encodings (covariance=)")
        self.inverse_covariance = inverse_covariance(covariance).to(self.concept_input.device)
        self.covariance_digest = covariance_digest(covariance)

    def _attentions(self) -> list[nn.Module]:
        return [self.unet[0].get_submodule(name) for name in self.layers]

    # --- the edit ------------------------------------------------------------------------------

    def _concepts(self, layer: int, role: str, weight: torch.Tensor):
        """Per concept (K rows): i*, C^-1 i*, and o* for this layer and role."""
        if self.training and self._live_input is not None:
            inputs = [self._live_input]
            metrics = [(self.inverse_covariance.float() @ self._live_input)]
        else:
            inputs, metrics = [self.concept_input], [self.concept_metric]
        class_inputs = [self.class_input]
        values = [self.values[layer]]
        for concept in self.extra:
            inputs.append(concept["concept_input"])
            metrics.append(concept["concept_metric"])
            class_inputs.append(concept["class_input"])
            values.append(concept["values"][layer])
        inputs, metrics = torch.stack(inputs).float(), torch.stack(metrics).float()
        # The key lock: o*_K is the class word's key, computed from the frozen W_K.
        outputs = F.linear(torch.stack(class_inputs).float(), weight.float()) if role == "key" else torch.stack(values)
        return inputs, metrics, outputs

    def _hook(self, layer: int, role: str):
        def edit(module, args, output):
            if not self.initialised:
                return output
            mask = self.mask
            if self.every_prompt:
                mask = torch.ones(output.shape[0], len(self.token_ids), dtype=torch.bool, device=output.device)
            if mask is None or not mask.any():
                return output
            if mask.shape[0] != output.shape[0]:
                raise ValueError(f"Perfusion concept mask for {mask.shape[0]} prompts, attention batch "
                                 f"{output.shape[0]}: encode the stacked prompts")
            inputs, metrics, outputs = self._concepts(layer, role, module.weight)
            beta, tau = (self.config.beta, self.config.tau) if self.training else (self.beta, self.tau)
            text = args[0].float()
            edited = output
            for pattern in torch.unique(mask, dim=0):
                if not pattern.any():
                    continue
                rows = (mask == pattern).all(1)
                active = pattern.nonzero()[:, 0]
                change = rank_one_change(text[rows], inputs[active], metrics[active], outputs[active],
                                         F.linear(inputs[active], module.weight.float()), beta, tau)
                edited = edited.clone() if edited is output else edited
                edited[rows] = (output[rows].float() + change).to(output.dtype)
            return edited
        return edit

    @contextmanager
    def route(self, states: list[torch.Tensor]):
        """The UNet calls inside see which of their prompts name a concept (states[1], the
        mask `encode` returned, stacked like the encodings)."""
        self.mask = states[1]
        try:
            yield
        finally:
            self.mask = None

    def prompt_context(self, input_ids: torch.Tensor | None):
        """diffusers' pipeline: its UNet calls edit the prompts that name a concept."""
        if input_ids is None:
            raise ValueError("a Perfusion adapter needs prompt= (which prompts name the concept is read from "
                             "their tokens), not prompt_embeds")
        return self.route([None, self.concept_mask(input_ids).to(self.concept_input.device)])

    @contextmanager
    def gate(self, beta: float | None = None, tau: float | None = None):
        """Inference's gate for the calls inside (None: keep the current value)."""
        if tau is not None and tau <= 0:
            raise ValueError(f"tau={tau}: the gate's temperature must be > 0")
        saved = self.beta, self.tau
        self.beta = saved[0] if beta is None else float(beta)
        self.tau = saved[1] if tau is None else float(tau)
        try:
            yield
        finally:
            self.beta, self.tau = saved

    def gate_settings(self) -> dict[str, float]:
        return {"beta": self.beta, "tau": self.tau}

    # --- more concepts, clean-up -------------------------------------------------------------

    def add_concept(self, concept, token_id: int, token: str) -> None:
        """A second concept trained apart (`concept`: its adapter file, whose `embedding.*`
        tensors are keyed as this module's state_dict), for inference. Both must come from
        the same C."""
        if not isinstance(concept.embedding, PerfusionConfig):
            raise ValueError(f"{concept.path} is not a Perfusion adapter (method={concept.meta['method'] or 'none'}): "
                             "only Perfusion concepts combine at inference")
        if len(self.token_ids) >= MAX_CONCEPTS:
            raise ValueError(f"Perfusion combines at most {MAX_CONCEPTS} concepts")
        if token_id in self.token_ids:
            raise ValueError(f"both concepts use the token {token!r}: give the second another one-piece token "
                             "(token=..., e.g. 'ohwx')")
        state = {k.removeprefix("embedding."): v for k, v in concept.tensors.items()}
        expected = self.state_dict()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(f"adapter {concept.path} does not fit this Perfusion concept's layers: expected "
                             f"{sorted(expected)[:3]}..., got {sorted(state)[:3]}...")
        digest = concept.meta.get("covariance_digest", "")
        if digest and self.covariance_digest and digest != self.covariance_digest:
            raise ValueError(f"the concepts were trained with different covariances C ({self.covariance_digest} "
                             f"vs {digest}); their edits cannot be combined")
        device = self.concept_input.device
        table = TokenEmbedding(self.text_encoder[0], token_id, token_id)
        with torch.no_grad():
            table.vectors.copy_(state["token.vectors"])
        table.vectors.requires_grad_(False)
        self.extra.append({
            "token_id": token_id, "embedding": table,
            **{key: state[key].to(device).float() for key in ("concept_input", "concept_metric", "class_input")},
            "values": [state[f"values.{k}"].to(device).float() for k in range(len(self.layers))]})

    def remove(self):
        self.token.remove()
        for concept in self.extra:
            concept["embedding"].remove()
        for handle in self.handles:
            handle.remove()


def rank_one_change(text: torch.Tensor, inputs: torch.Tensor, metrics: torch.Tensor, outputs: torch.Tensor,
                    projected: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """What the gated rank-one edit adds to W e, for text rows e (..., L, D) and K concepts
    (inputs i*_c, metrics C^-1 i*_c, outputs o*_c, projected W i*_c):
        - W e_par + sum_c sigmoid((sim_c/E_c - beta)/tau) o*_c,
    e_par being e's C^-1-orthogonal projection on span(i*_c). For one concept e_par =
    (sim/E) i*, the paper's equation."""
    sim = text @ metrics.T                                   # (..., L, K): e^T C^-1 i*_c
    gram = inputs @ metrics.T                                # (K, K): i*_c^T C^-1 i*_d; its diagonal E_c
    coefficients = torch.linalg.solve(gram, sim.unsqueeze(-1)).squeeze(-1) if len(inputs) > 1 else sim / gram[0, 0]
    gates = torch.sigmoid((sim / torch.diagonal(gram) - beta) / tau)
    return gates @ outputs - coefficients @ projected
