"""Preflight: everything a run needs that is not a per-item file (the base model with its
tokenizer, annotator and evaluator models, the shapes oracles, the class-image cache, a
checkpoint to resume) is checked before the first step. A missing one stops the entry
point in one line naming the config key, the value tried and what to do:

    data.train.depth_model=Intel/dpt-hybrid-midas: not a local folder, not in the Hugging Face
    cache, and the hub is not reachable (ConnectError); give a local path to a depth-estimation model folder

Without it, a missing annotator model made every item of a run fail and be skipped one by
one. Checks are cheap (files present, a hub file's metadata): the models themselves load
where they are used.

    check_train(cfg)                 train.py (a Hydra config)
    check_eval(cfg, control)         eval.py
    check_base_model(key, value)     generate.py, the demo
    check_edit(cfg)                  edit.py (an EditConfig)
"""

from __future__ import annotations

import re
import uuid
import zipfile
from pathlib import Path

from omegaconf import DictConfig

from orthodiff.adapter import read_adapter
from orthodiff.eval.control_metrics import ORACLE_FOR
from orthodiff.eval.oracles import DEFAULT_PATH as ORACLES
from orthodiff.eval.oracles import TRAIN_COMMAND as ORACLES_COMMAND
from orthodiff.models.base import SINGLE_FILE_SUFFIXES, resolve_pretrained

# What load_base_model reads from a diffusers folder, and a file each part must hold.
BASE_COMPONENTS = {"unet": ("config.json", "weights"), "vae": ("config.json", "weights"),
                   "text_encoder": ("config.json", "weights"), "tokenizer": ("vocab.json",),
                   "scheduler": ("scheduler_config.json",)}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TINY = "model=tiny (assets/tiny-sd)"


class MissingResourceError(FileNotFoundError):
    """A model or file a run needs is not there; the message is one line."""


def fail(key: str, value, problem: str, remedy: str):
    raise MissingResourceError(f"{key}={value}: {problem}; {remedy}")


def user_key(cfg: DictConfig, key: str) -> str:
    """The key a user sets for `key`, following ${...} interpolations (module.pretrained ->
    model.pretrained)."""
    for _ in range(8):
        node = cfg
        for part in key.split("."):
            node = node._get_node(part) if node is not None else None
        raw = node._value() if node is not None else None
        match = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        if match is None:
            return key
        key = match.group(1)
    return key


def is_hub_id(value: str) -> bool:
    """"org/name": what from_pretrained would look up on the Hugging Face hub."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None and not value.startswith(".")


def hub_problem(repo: str, filename: str) -> str | None:
    """None when `filename` of hub repo `repo` is cached or reachable; else why not. No
    retries: an offline machine answers at once."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "not a local folder, not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename), timeout=10)
    except Exception as error:  # no network, no such repository, gated: the user's remedy is the same
        return ("not a local folder, not in the Hugging Face cache, and the hub is not reachable "
                f"({type(error).__name__})")
    return None


def check_model(key: str, value, what: str, required: str = "config.json") -> None:
    """A transformers/diffusers model given as a local folder or a hub id."""
    remedy = f"give a local path to a {what} folder (save_pretrained format)"
    path = Path(str(value)).expanduser()
    if path.is_dir():
        if not (path / required).is_file():
            fail(key, value, f"the folder has no {required}", remedy)
    elif path.exists() or not is_hub_id(str(value)):
        fail(key, value, "no such folder", remedy)
    elif (problem := hub_problem(str(value), required)) is not None:
        fail(key, value, problem, remedy)


def check_base_model(key: str, value, original_config_key: str | None = None, original_config=None) -> None:
    """A diffusers folder holding every part load_base_model reads, a single-file checkpoint,
    or a hub id that is cached or reachable."""
    if value is None:
        fail(key, value, "no base model given", f"name a diffusers folder, a single file or a hub id ({TINY})")
    source = resolve_pretrained(str(value))
    path = Path(source)
    if source.endswith(SINGLE_FILE_SUFFIXES):
        if not path.is_file():
            fail(key, value, "no such single-file checkpoint", f"give an existing .safetensors/.ckpt file, or {TINY}")
        if original_config and not Path(str(original_config)).expanduser().exists():
            fail(original_config_key or "original_config", original_config, "no such file or folder",
                 "give the checkpoint's config (YAML or diffusers folder) or null")
        return
    if not path.exists():
        if not is_hub_id(source):
            fail(key, value, "no such folder", f"give a diffusers pipeline folder, a single file or a hub id ({TINY})")
        if (problem := hub_problem(source, "model_index.json")) is not None:
            fail(key, value, problem, f"give a local path to the model's diffusers folder ({TINY} is embedded)")
        return
    if not (path / "model_index.json").is_file():
        fail(key, value, f"{path} is not a diffusers pipeline folder (no model_index.json)",
             f"give a folder written by save_pretrained, a single file or a hub id ({TINY})")
    for part, needed in BASE_COMPONENTS.items():
        folder = path / part
        missing = [name for name in needed if name != "weights" and not (folder / name).is_file()]
        if "weights" in needed and not any(p.suffix in WEIGHT_SUFFIXES for p in folder.glob("*")):
            missing.append("weights (*.safetensors or *.bin)")
        if missing:
            fail(key, value, f"the base model folder has no {part}" + ("" if not folder.is_dir() else
                 f" {', '.join(missing)}"), f"give a complete diffusers folder (save_pretrained layout), or {TINY}")


def check_oracle(key: str, value, name: str) -> None:
    """A shapes-world evaluator network under the repository's assets/oracles (load_oracle's)."""
    folder = ORACLES / name
    if not (folder / "config.json").is_file() or not any(p.suffix in WEIGHT_SUFFIXES for p in folder.glob("*")):
        fail(key, value, f"the shapes {name} oracle {folder} is missing",
             f"make it with `{ORACLES_COMMAND} --out {ORACLES}`")


def check_control_evaluator(key: str, value, control: str) -> None:
    for part in control.split("+"):  # a joint control ("canny+seg"): each condition's evaluator
        if part not in ORACLE_FOR:  # canny: edges, no network
            continue
        if value == "shapes":
            check_oracle(key, value, ORACLE_FOR[part])
        else:
            check_model(key, value, f"{'segmentation' if part == 'seg' else 'depth-estimation'} model")


def check_writable(key: str, value) -> None:
    folder = Path(str(value)).expanduser()
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        fail(key, value, f"cannot write there ({error.strerror or error})", "give a writable folder")


def check_checkpoint(key: str, value) -> None:
    """A checkpoint to resume: an existing, complete torch zip file (a truncated write has no
    central directory)."""
    path = Path(str(value)).expanduser()
    remedy = "give a .ckpt a run wrote (<run>/checkpoints/last.ckpt), or resume=null"
    if not path.is_file():
        fail(key, value, "no such checkpoint", remedy)
    if not zipfile.is_zipfile(path):
        fail(key, value, "not a readable checkpoint (truncated, or not written by torch.save)", remedy)


def check_train(cfg: DictConfig) -> None:
    """Everything train.py's config names that the run will load, before any data is read."""
    if cfg.get("resume"):
        check_checkpoint("resume", cfg.resume)
    module = cfg.module
    check_base_model(user_key(cfg, "module.pretrained"), module.get("pretrained"),
                     user_key(cfg, "module.original_config"), module.get("original_config"))
    if "control" in module:
        check_control_evaluator(user_key(cfg, "module.evaluator"), module.evaluator, module.control)
    elif module.get("evaluator") == "shapes":
        check_oracle(user_key(cfg, "module.evaluator"), "shapes", "classifier")
    elif module.get("evaluator") in ("dino", "clip") and not module.get(f"{module.evaluator}_model"):
        fail(user_key(cfg, f"module.{module.evaluator}_model"), None, f"evaluator={module.evaluator} needs it",
             "give a local path to the model folder (or a cached hub id)")
    for name, what in (("dino_model", "DINO model"), ("clip_model", "CLIP model")):
        if module.get(name):
            check_model(user_key(cfg, f"module.{name}"), module[name], what)
    if module.get("prior_loss_weight", 0) > 0:
        check_writable(user_key(cfg, "module.prior_cache_dir"), module.prior_cache_dir)
    for split in ("train", "val"):  # eval.py's test split is not built by train.py
        dataset = cfg.data.get(split)
        if isinstance(dataset, DictConfig) and dataset.get("depth_model") and dataset.get("control") == "depth":
            check_model(user_key(cfg, f"data.{split}.depth_model"), dataset.depth_model, "depth-estimation model")


def check_eval(cfg: DictConfig, control: str | None) -> None:
    """Everything eval.py's config names that the evaluation will load, before generating."""
    check_base_model("model.pretrained", cfg.model.pretrained, "model.original_config",
                     cfg.model.get("original_config"))
    if control is not None:
        check_control_evaluator("evaluator", cfg.evaluator, control)
    if cfg.get("clip_model"):
        check_model("clip_model", cfg.clip_model, "CLIP model")
    weights = cfg.fid.get("inception_weights")
    if weights and not Path(str(weights)).expanduser().is_file():
        fail("fid.inception_weights", weights, "no such file", "give torch-fidelity's pt_inception-2015-12-05 "
             "weights file, or null (FID with shapes features)")
    test = cfg.data.get("test")
    if isinstance(test, DictConfig) and test.get("depth_model") and control == "depth":
        check_model(user_key(cfg, "data.test.depth_model"), test.depth_model, "depth-estimation model")


def check_edit(cfg) -> None:
    """Everything edit.py's settings name that the edit will load: the base model (given, the
    adapter's, or the embedded tiny SD), CLIP and the perceptual weights, or the shapes
    oracles that score an edit without them."""
    if cfg.base:
        check_base_model("base", cfg.base)
    elif cfg.adapter:
        path = Path(cfg.adapter).expanduser()
        path = path / "adapter.safetensors" if path.is_dir() else path
        if path.is_file():  # a missing adapter file is edit.py's own error
            check_base_model("base (none given: the adapter's base_model)", read_adapter(path)[1]["base_model"])
    else:
        check_base_model("base (none given: the embedded tiny SD)", "assets/tiny-sd")
    if cfg.clip_model:
        check_model("clip_model", cfg.clip_model, "CLIP model")
    else:
        for name in ("classifier", "segmenter"):
            check_oracle("clip_model", None, name)
    for key in ("perceptual", "lpips"):
        value = getattr(cfg, key, None)
        if value and not Path(str(value)).expanduser().is_file():
            fail(key, value, "no such weights file", "give a local path to the weights file")
