"""Perfusion (method=perfusion): the gated rank-one edit against the paper's equation, the
key lock, C^-1, what trains, the adapter through save/load, the pipeline, generate.py and
export, the gate at inference and two concepts combined."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orthodiff.adapter import add_concept, load_adapter, read_adapter, save_adapter
from orthodiff.data.shapes import scene_caption
from orthodiff.data.subjects import subject_images
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.models.perfusion import inverse_covariance, rank_one_change, text_covariance
from orthodiff.pipelines import OrthodiffPipeline
from orthodiff.tasks import SubjectTask
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-sd")
PROMPT = "a sks square on a white background"
PLAIN = "a red circle on a black background"


def _train(module, steps=3, lr=1e-2, text=PROMPT):
    pixels = images_to_tensor(np.stack(subject_images("striped_square", 2))) * 2 - 1
    batch = {"pixel_values": pixels, "text": [text] * 2, "index": torch.arange(2)}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    for step in range(steps):
        loss = module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Perfusion concept after a few steps, o*_V nudged further (as longer training would), saved."""
    torch.manual_seed(0)
    module = _train(SubjectTask(embedding="perfusion", method="perfusion", val_steps=2))
    with torch.no_grad():
        for value in module.embedding.values:
            value.add_(0.3 * torch.randn_like(value))
    return module, save_adapter(tmp_path_factory.mktemp("perfusion") / "adapter.safetensors", module)


def _encode(module, prompts):
    return module.embedding.encode(module.token_ids(prompts))


def _attention_outputs(module, states, layer=0):
    """K and V of the first cross-attention layer for encodings `states` ([encoding, mask])."""
    attention = module.unet.get_submodule(module.embedding.layers[layer])
    with module.embedding.route(states):
        return attention.to_k(states[0]), attention.to_v(states[0])


def test_only_the_embedding_and_the_value_targets_train():
    module = SubjectTask(embedding="perfusion")
    trainable = {name: p.numel() for name, p in module.named_parameters() if p.requires_grad}
    layers = module.embedding.layers
    assert set(trainable) == {"embedding.token.vectors", *(f"embedding.values.{k}" for k in range(len(layers)))}
    outputs = [module.unet.get_submodule(name).to_v.out_features for name in layers]
    assert sum(trainable.values()) == 64 + sum(outputs)  # no key vector: o*_K is locked
    unet = {k: v.clone() for k, v in module.unet.state_dict().items()}
    before = module.generate([PLAIN], steps=2, progress=False)
    assert not module.embedding.initialised  # an untrained concept edits nothing
    _train(module, steps=2)
    assert module.embedding.initialised
    assert all(torch.equal(v, module.unet.state_dict()[k]) for k, v in unet.items())
    assert torch.equal(before, module.generate([PLAIN], steps=2, progress=False))  # no token: the base model


def test_a_prompt_without_the_concept_gets_the_base_projections(trained):
    module, _ = trained
    with torch.no_grad():
        states = _encode(module, [PLAIN, PROMPT])
        keys, values = _attention_outputs(module, states)
        attention = module.unet.get_submodule(module.embedding.layers[0])
        base_keys = F.linear(states[0], attention.to_k.weight)
        base_values = F.linear(states[0], attention.to_v.weight)
    torch.testing.assert_close(keys[0], base_keys[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(values[0], base_values[0], atol=1e-6, rtol=0)
    assert (values[1] - base_values[1]).abs().max() > 1e-2  # the concept's prompt is edited
    # The paper's code edits every prompt: there the plain prompt changes too.
    module.embedding.every_prompt = True
    try:
        with torch.no_grad():
            _, everywhere = _attention_outputs(module, states)
    finally:
        module.embedding.every_prompt = False
    assert (everywhere[0] - base_values[0]).abs().max() > 1e-4


def test_the_edit_is_the_papers_equation(trained):
    module, _ = trained
    perfusion = module.embedding
    attention = module.unet.get_submodule(perfusion.layers[1])
    with torch.no_grad():
        states = _encode(module, [PROMPT])
        _, values = _attention_outputs(module, states, layer=1)
        e, i, u = states[0][0].double(), perfusion.concept_input.double(), perfusion.concept_metric.double()
        W, o = attention.to_v.weight.double(), perfusion.values[1].double()
        ratio = (e @ u) / (i @ u)  # sim / E
        gate = torch.sigmoid((ratio - perfusion.beta) / perfusion.tau)
        expected = e @ W.T - ratio[:, None] * (W @ i) + gate[:, None] * o
    torch.testing.assert_close(values[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_at_the_concept_the_key_is_the_class_words_key(trained):
    module, _ = trained
    perfusion = module.embedding
    attention = module.unet.get_submodule(perfusion.layers[0])
    row = perfusion.concept_input.expand(1, 3, -1).clone()  # sim/E = 1 on every row
    class_key = F.linear(perfusion.class_input, attention.to_k.weight)
    mask = torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad(), perfusion.route([row, mask]):
        with perfusion.gate(tau=1e-4):  # an open gate: the locked key exactly
            locked = attention.to_k(row)
        soft = attention.to_k(row)  # the default gate, sigmoid((1 - 0.7) / 0.15), scales it
    torch.testing.assert_close(locked[0], class_key.expand(3, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(soft[0], torch.sigmoid(torch.tensor(0.3 / 0.15)) * class_key.expand(3, -1),
                               atol=1e-5, rtol=0)


def test_the_covariance_inverse_is_symmetric_positive_definite():
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(Path(TINY) / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(Path(TINY) / "text_encoder")
    captions = [scene_caption(k) for k in range(64)]
    covariance = text_covariance(text_encoder, tokenizer, captions, batch_size=20)
    with torch.no_grad():
        ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        rows = text_encoder(ids)[0].reshape(-1, 64).double()
    torch.testing.assert_close(covariance, rows.T @ rows / len(rows))  # uncentred, every position
    inverse = inverse_covariance(covariance)
    assert torch.equal(inverse, inverse.T)
    assert torch.linalg.eigvalsh(inverse).min() > 0
    # The ridge that keeps it definite is small: inverse^-1 is C up to 1e-5 x C's mean eigenvalue.
    ridge = torch.linalg.matrix_norm(torch.linalg.inv(inverse) - covariance, ord=2)
    assert ridge <= 1.01e-5 * torch.trace(covariance) / 64


def test_two_concepts_replace_their_span_by_their_outputs():
    torch.manual_seed(0)
    width, out = 8, 5
    metric = torch.randn(width, width, dtype=torch.float64)
    metric = metric @ metric.T + width * torch.eye(width, dtype=torch.float64)  # a C^-1
    first = torch.randn(width, dtype=torch.float64)
    second = torch.randn(width, dtype=torch.float64)
    second -= (first @ metric @ second) / (first @ metric @ first) * first  # C^-1-orthogonal to the first
    inputs = torch.stack([first, second])
    metrics, weight = inputs @ metric, torch.randn(out, width, dtype=torch.float64)
    outputs = torch.randn(2, out, dtype=torch.float64)
    text = torch.stack([first, second, first + second])[None]
    change = rank_one_change(text, inputs, metrics, outputs, inputs @ weight.T, beta=0.5, tau=1e-4)
    result = text @ weight.T + change
    torch.testing.assert_close(result[0, 0], outputs[0])  # the first concept's input: its output alone
    torch.testing.assert_close(result[0, 1], outputs[1])
    torch.testing.assert_close(result[0, 2], outputs[0] + outputs[1])
    # One concept: the same function is the single-concept equation.
    single = rank_one_change(text, inputs[:1], metrics[:1], outputs[:1], inputs[:1] @ weight.T, beta=0.5, tau=0.2)
    ratio = (text @ metrics[0]) / (first @ metrics[0])
    expected = -ratio[..., None] * (weight @ first) + torch.sigmoid((ratio - 0.5) / 0.2)[..., None] * outputs[0]
    torch.testing.assert_close(single, expected)


def test_the_adapter_round_trips_through_its_file_and_the_pipeline(trained):
    module, path = trained
    tensors, meta = read_adapter(path)
    assert meta["method"] == "perfusion" and meta["embedding"] == "perfusion"
    assert json.loads(meta["perfusion"])["inference_beta"] == 0.7 and len(meta["covariance_digest"]) == 16
    assert sum(t.numel() for t in tensors.values()) < 1500 and path.stat().st_size < 10_000
    again = load_adapter(path)
    prompts = [PROMPT, PLAIN]
    reference = module.generate(prompts, steps=3, guidance=4.0, progress=False)
    torch.testing.assert_close(again.generate(prompts, steps=3, guidance=4.0, progress=False), reference,
                               atol=1e-5, rtol=0)
    pipe = OrthodiffPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_adapter(path)
    assert pipe.merge() == 0  # nothing to fold: the edit depends on the prompt
    # generate.py's sampler: the training module's, to the bit.
    assert torch.equal(pipe.generate(prompts, steps=3, guidance=4.0, progress=False),
                       again.generate(prompts, steps=3, guidance=4.0, progress=False))

    def sample(**kwargs):
        return pipe(prompts, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **kwargs).images

    torch.testing.assert_close(sample(), reference, atol=1e-5, rtol=0)
    # The gate reaches sampling: another beta changes the concept's samples, not the plain prompt's.
    closed = sample(perfusion_beta=1.5)
    assert (closed[0] - reference[0]).abs().max() > 1e-2
    torch.testing.assert_close(closed[1], reference[1], atol=1e-5, rtol=0)
    with module.embedding.gate(beta=1.5, tau=0.3):
        torch.testing.assert_close(sample(perfusion_beta=1.5, perfusion_tau=0.3),
                                   module.generate(prompts, steps=3, guidance=4.0, progress=False), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no control image"):
        pipe(PROMPT, control_image=np.zeros((64, 64), np.uint8))


def test_two_concepts_trained_apart_combine_at_inference(trained, tmp_path):
    module, path = trained
    torch.manual_seed(1)
    other = _train(SubjectTask(embedding="perfusion", method="perfusion", class_word="circle"), steps=2,
                   text="a sks circle on a white background")
    second = save_adapter(tmp_path / "circle.safetensors", other)
    with pytest.raises(ValueError, match="both concepts use the token 'sks'"):
        again = load_adapter(path)
        add_concept(again.embedding, again.unet, again.tokenizer, second)
    pipe = OrthodiffPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_adapter(path).load_adapter(second, token="ohwx")
    prompts = [PROMPT, "a ohwx circle on a white background", "a sks square and a ohwx circle on a white background"]
    both = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    alone = module.generate(prompts[:1], steps=2, guidance=7.5, progress=False)
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=0)  # the second concept leaves the first's prompts
    assert (both[1] - both[2]).abs().max() > 1e-2


@pytest.mark.slow
def test_generate_takes_the_gate_and_export_refuses_with_one_line(trained, tmp_path):
    _, path = trained
    out = tmp_path / "out"
    result = run_script("generate.py", [f"adapter={path}", f"prompt={PROMPT}", "num_images=1", "steps=2", "beta=0.9",
                                        "tau=0.2", f"out={out}"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "generate.json").read_text())
    assert record["beta"] == 0.9 and record["tau"] == 0.2 and record["method"] == "perfusion"
    result = subprocess.run([sys.executable, "-m", "orthodiff.app.export", f"adapter={path}", f"out={tmp_path / 'x'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("orthodiff.app.export")]
    assert len(lines) == 1 and "depends on the prompt" in lines[0] and "cannot be folded" in lines[0]
