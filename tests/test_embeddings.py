"""Textual Inversion and P+ hooks: the learned vectors are the only trainable tensors, they
act only where the token appears, and P+ gives each cross-attention layer its own text."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from orthodiff.models.embeddings import PerLayerEmbedding, TokenEmbedding, cross_attention_layers

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"


@pytest.fixture(scope="module")
def parts():
    tokenizer = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(TINY / "text_encoder", torch_dtype=torch.float32).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(TINY / "unet", torch_dtype=torch.float32).requires_grad_(False)
    return tokenizer, text_encoder, unet


def ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids


def one_id(tokenizer, word):
    (token,) = tokenizer(word, add_special_tokens=False).input_ids
    return token


def test_textual_inversion_starts_as_the_class_word_and_trains_only_its_vector(parts):
    tokenizer, text_encoder, _ = parts
    ti = TokenEmbedding(text_encoder, one_id(tokenizer, "sks"), one_id(tokenizer, "square"))
    try:
        with torch.no_grad():
            token = text_encoder(ids(tokenizer, ["a sks square on a white background"]))[0]
            word = text_encoder(ids(tokenizer, ["a square square on a white background"]))[0]
            other = text_encoder(ids(tokenizer, ["a red circle"]))[0]
        torch.testing.assert_close(token, word)
        text_encoder(ids(tokenizer, ["a sks square"]))[0].sum().backward()
        assert ti.vectors.grad is not None and ti.vectors.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in text_encoder.parameters())
        with torch.no_grad():
            ti.vectors.add_(1.0)
            assert not torch.allclose(text_encoder(ids(tokenizer, ["a sks square on a white background"]))[0], token)
            torch.testing.assert_close(text_encoder(ids(tokenizer, ["a red circle"]))[0], other)  # no token: untouched
    finally:
        ti.remove()


def test_pplus_gives_each_cross_attention_layer_its_own_text(parts):
    tokenizer, text_encoder, unet = parts
    layers = cross_attention_layers(unet)
    assert len(layers) == 7 and layers[0].startswith("down_blocks") and layers[2].startswith("mid_block")
    pplus = PerLayerEmbedding(text_encoder, unet, one_id(tokenizer, "sks"), one_id(tokenizer, "square"))
    try:
        prompt = ids(tokenizer, ["a sks square on a white background"] * 2)
        torch.manual_seed(0)
        latents, t = torch.randn(2, unet.config.in_channels, 16, 16), torch.tensor([300, 700])
        with torch.no_grad():
            contexts = pplus.encode(prompt)
            plain = unet(latents, t, encoder_hidden_states=contexts[0]).sample
            with pplus.route(contexts):  # all vectors equal: the same as one context
                torch.testing.assert_close(unet(latents, t, encoder_hidden_states=contexts[0]).sample, plain)
            pplus.token.vectors[len(layers) - 1].add_(2.0)  # only the last up-block layer changes
            contexts = pplus.encode(prompt)
            assert torch.equal(contexts[0], contexts[3]) and not torch.equal(contexts[0], contexts[-1])
            with pplus.route(contexts):
                changed = unet(latents, t, encoder_hidden_states=contexts[0]).sample
            assert not torch.allclose(changed, plain)
        with pplus.route(pplus.encode(prompt)):
            unet(latents, t, encoder_hidden_states=torch.zeros(2, 77, 64)).sample.pow(2).mean().backward()
        assert (pplus.token.vectors.grad.abs().sum(dim=1) > 0).all()  # every layer's vector is used
        assert list(pplus.state_dict()) == ["token.vectors"]
    finally:
        pplus.remove()
