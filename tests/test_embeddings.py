"""Textual Inversion and P+ hooks: the learned vectors are the only trainable tensors, they
act only where the token appears, and P+ gives each cross-attention layer its own text. The
embeddings' one interface (models/embeddings.py): each method's config composes its own, a new
method is one config class and one config file, and adapter files written before it still load."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import CLIPTextModel, CLIPTokenizer

from orthodiff.adapter import AdapterFile, load_adapter, save_adapter
from orthodiff.data.subjects import subject_images
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.models import PerfusionConfig, PPlusConfig, SubjectEncoderConfig, TextualInversionConfig
from orthodiff.models.embeddings import EmbeddingConfig, PerLayerEmbedding, TokenEmbedding, cross_attention_layers
from orthodiff.pipelines import OrthodiffPipeline
from orthodiff.tasks import SubjectTask

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-sd"
OLD = ROOT / "tests" / "fixtures" / "adapters_d8ec8e9"  # written before issue 32 (README there)


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


def _pipeline():
    pipe = OrthodiffPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("method", ["textual_inversion", "pplus", "perfusion", "encoder", "coft", "lora", "full"])
def test_each_subject_method_composes_its_own_embedding(method):
    expected = {"textual_inversion": TextualInversionConfig, "pplus": PPlusConfig, "perfusion": PerfusionConfig,
                "encoder": SubjectEncoderConfig}.get(method)  # None: the UNet's adapter trains
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["experiment=dreambooth", f"method={method}"])
    embedding = instantiate(cfg.module.embedding)
    assert type(embedding) is (expected or type(None)), (method, embedding)
    assert (cfg.adapter is None) == (expected is not None)


# The files' own metadata (their token, class word, embedding kind and its settings), as the
# code before issue 32 wrote it: what the current code must read and write alike.
OLD_FILES = {"textual_inversion": TextualInversionConfig, "pplus": PPlusConfig, "perfusion": PerfusionConfig,
             "encoder": TextualInversionConfig}  # the encoder method's file is read as Textual Inversion


@pytest.mark.parametrize("name", sorted(OLD_FILES))
def test_adapter_files_written_before_the_interface_still_load_and_sample(name):
    file = AdapterFile.read(OLD / f"{name}.safetensors")
    assert type(file.embedding) is OLD_FILES[name]
    module = load_adapter(file, allow_other_base=True)  # a re-pretrained tiny SD keeps the shapes
    written = module.task_metadata()  # the current writer writes the old keys and values
    assert written == {k: file.meta[k] for k in written} and set(written) | {"encoder"} >= {
        k for k in ("token", "class_word", "embedding", "perfusion", "covariance_digest", "encoder") if k in file.meta}
    assert all(torch.equal(module.trainable_state_dict()[k], v) for k, v in file.tensors.items())
    prompts = ["a sks triangle on a black background", "a red circle"]
    reference = module.generate(prompts, steps=2, progress=False)
    pipe = _pipeline().load_adapter(file, allow_other_base=True)
    assert torch.equal(pipe.generate(prompts, steps=2, progress=False), reference)  # generate.py's path
    if name == "pplus":
        with pytest.raises(ValueError, match="diffusers' pipeline cannot feed"):
            pipe(prompts[0], num_inference_steps=2)
        return
    images = pipe(prompts, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    torch.testing.assert_close(images, reference, atol=1e-5, rtol=0)  # diffusers' loop: the same to 1e-5
    if name == "perfusion":
        assert pipe.embedding.covariance_digest == file.meta["covariance_digest"] != ""
        pipe.load_adapter(OLD / "perfusion_circle.safetensors", token="ohwx", allow_other_base=True)
        assert pipe.embedding.token_ids[1] != pipe.embedding.token_ids[0]


@dataclass
class ShiftedTokenConfig(EmbeddingConfig):
    """A method added by this test alone: Textual Inversion whose word starts `shift` away
    from the class word. One class (subclassing registers it) and one config file."""

    shift: float = 0.5

    kind = "test_shifted_token"

    def build(self, text_encoder, unet, token_id, init_id, task=None):
        embedding = TokenEmbedding(text_encoder, token_id, init_id)
        with torch.no_grad():
            embedding.vectors.add_(self.shift)
        return embedding

    def metadata(self, embedding):
        return {"embedding": self.kind, "shift": repr(self.shift)}

    @classmethod
    def from_metadata(cls, meta):
        return cls(shift=float(meta["shift"]))


def test_a_new_embedding_method_is_one_config_class_and_one_config_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "method" / "shifted.yaml").write_text(
        "# @package _global_\nmethod:\n  name: shifted\n  tasks: [subject]\n  control_network: null\n"
        f"adapter: null\nembedding:\n  _target_: {__name__}.ShiftedTokenConfig\n  shift: 0.25\n")
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("train", overrides=["experiment=dreambooth", "method=shifted"])
    config = instantiate(cfg.module.embedding)
    assert config == ShiftedTokenConfig(shift=0.25)
    torch.manual_seed(0)
    module = SubjectTask(embedding=config, method="shifted", val_steps=2)
    start = module.embedding.vectors.detach().clone()
    class_id = module.tokenizer("square", add_special_tokens=False).input_ids[-1]
    torch.testing.assert_close(start[0], module.text_encoder.get_input_embeddings().weight[class_id] + 0.25)
    pixels = images_to_tensor(np.stack(subject_images("striped_square", 2))) * 2 - 1
    batch = {"pixel_values": pixels, "text": ["a sks square on a white background"] * 2, "index": torch.arange(2)}
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable == [module.embedding.vectors]  # only its word trains
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(2):
        loss = module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (module.embedding.vectors - start).abs().max() > 1e-3
    path = save_adapter(tmp_path / "adapter.safetensors", module.eval())
    file = AdapterFile.read(path)
    assert file.meta["embedding"] == "test_shifted_token" and file.embedding == config
    prompts = ["a sks square on a black background"]
    pipe = _pipeline().load_adapter(file)  # inference builds it from the file alone
    assert torch.equal(pipe.generate(prompts, steps=2, progress=False),
                       module.generate(prompts, steps=2, progress=False))
