import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on CI's two cores: one thread each, and for what they start
    # (a notebook kernel took 10x longer with two OpenMP threads contending with the other worker).
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """Slow tests first (stable otherwise), so the workers start on the longest ones rather than
    one of them finishing the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small shapes-world dataset in its on-disk folder format (48 train, 16 val, 8 test)."""
    from orthodiff.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, 48, n_val=16, n_test=8, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP folder (model + processor, save_pretrained format) with
    the real CLIP BPE tokenizer; seed 2 gives positive cosines on the test pairs, so the
    score is not floored at 0 and checks the embeddings."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(2)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tokenizer_files = folder / "tokenizer-source"
    shutil.copytree(ROOT / "assets" / "tiny-sd" / "tokenizer", tokenizer_files)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_files))
    processor.save_pretrained(folder)
    return folder
