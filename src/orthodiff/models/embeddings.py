"""Learned token embeddings for Textual Inversion and Extended Textual Inversion (P+).

Both leave every network frozen and unchanged: hooks swap learned vectors in.

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

from contextlib import contextmanager

import torch
from torch import nn


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules in the order data flows: down, mid, up
    (diffusers registers the mid block last)."""
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: order[n.split(".")[0]])


class TokenEmbedding(nn.Module):
    """One learned input embedding for `token_id`, swapped in by a forward hook on the
    text encoder's token embedding table (which stays frozen)."""

    def __init__(self, text_encoder: nn.Module, token_id: int, init_id: int, count: int = 1):
        super().__init__()
        table = text_encoder.get_input_embeddings()
        self.text_encoder = [text_encoder]  # a list: not a submodule (stays out of state_dict)
        self.token_id = token_id
        self.vectors = nn.Parameter(table.weight[init_id].detach().clone().float().repeat(count, 1))
        self.active = 0  # which vector the hook swaps in (P+ switches between them)
        self.rows: torch.Tensor | None = None  # (N, D): one vector per prompt instead (per_row)
        self.handle = table.register_forward_hook(self._swap)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoding of `input_ids`, the token's rows read through the learned vector."""
        return self.text_encoder[0](input_ids)[0]

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


class PerLayerEmbedding(nn.Module):
    """P+: one learned vector per UNet cross-attention layer. `encode` runs the text
    encoder once per layer; `route` makes each attn2 read its own encoding."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, token_id: int, init_id: int):
        super().__init__()
        self.layers = cross_attention_layers(unet)
        self.text_encoder = [text_encoder]  # a list: not a submodule (stays out of state_dict)
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
    def route(self, contexts: list[torch.Tensor]):
        self.contexts = contexts
        try:
            yield
        finally:
            self.contexts = None

    def remove(self):
        self.token.remove()
        for handle in self.handles:
            handle.remove()
