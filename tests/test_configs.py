"""Hydra composition: every experiment with every method its task allows composes the
method's own adapter, the experiment's settings win, and a pair that does not fit is
refused with one line naming both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from orthodiff.app.train import check_method_fits
from orthodiff.models import FullFinetuneConfig, LoRAConfig
from orthodiff.oft import DEFAULT_TARGETS, OFTConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
# What each method trains in the UNet: its adapter class (None: the UNet stays frozen).
UNET_ADAPTERS = {"oft": OFTConfig, "coft": OFTConfig, "coft_rotation": OFTConfig, "coft_matched": OFTConfig, "lora": LoRAConfig,
                 "full": FullFinetuneConfig, "hint": None, "controlnet": None, "t2i_adapter": None, "t2i_adapter_light": None,
                 "textual_inversion": None, "pplus": None, "perfusion": None, "encoder": None}


@pytest.fixture(autouse=True)
def forget_hydra_config():
    """Tests here set Hydra's global config (check_method_fits reads the experiment's name from
    it); later tests in the session must not inherit it."""
    yield
    HydraConfig.instance().cfg = None


def compose_train(overrides: list[str], conf: Path = CONF):
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        return compose("train", overrides=overrides, return_hydra_config=True)


def experiment_lr(name: str) -> float | str | None:
    """The learning rate an experiment file (or the base it includes) sets, read from YAML
    (an interpolation such as ${method.tiny_control_lr} comes back as its string)."""
    config = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    lr = OmegaConf.to_container(config).get("module", {}).get("optimizer", {}).get("lr")
    for entry in config.get("defaults", []):
        if isinstance(entry, str) and lr is None:
            lr = experiment_lr(entry)
    return lr


def test_every_method_is_listed():
    assert sorted(UNET_ADAPTERS) == METHODS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_with_each_method_composes_the_methods_own_adapter(experiment):
    for method in METHODS:
        cfg = compose_train([f"experiment={experiment}", f"method={method}"])
        HydraConfig.instance().set_config(cfg)
        if cfg.task_name not in cfg.method.tasks:
            with pytest.raises(SystemExit, match=f"method={method} does not fit experiment={experiment}"):
                check_method_fits(cfg)
            continue
        check_method_fits(cfg)
        assert cfg.method.name == method
        adapter = instantiate(cfg.adapter) if cfg.adapter is not None else None
        expected = UNET_ADAPTERS[method]
        assert type(adapter) is (expected or type(None)), (experiment, method, cfg.adapter)
        if expected is LoRAConfig:
            assert not {"coft", "eps", "num_blocks"} & set(cfg.adapter), "LoRA composes no OFT keys"
        if expected is OFTConfig:
            assert adapter.coft == method.startswith("coft")
            # one meaning per name: method=coft is the paper convention in every task, coft_rotation the other
            if adapter.coft:
                assert adapter.coft_norm == ("rotation" if method == "coft_rotation" else "paper"), (experiment, method)
            if method == "coft" and cfg.task_name == "control":
                assert adapter.eps == 1e-3, experiment
            if method == "coft" and cfg.task_name == "subject":  # the paper's 6e-5 on SD 1.5, scale-matched on tiny
                assert adapter.eps == (2.5e-3 if cfg.model.pretrained == "assets/tiny-sd" else 6e-5), experiment
        if cfg.task_name == "control":
            assert cfg.method.control_network is not None
            no_unet_adapter = method in ("hint", "controlnet", "t2i_adapter", "t2i_adapter_light")
            assert (cfg.adapter is None) == no_unet_adapter
        lr = experiment_lr(experiment)
        if lr == "${method.tiny_control_lr}":
            lr = cfg.method.tiny_control_lr  # the tiny control experiments train at the method's own lr
        if lr is not None:
            assert cfg.module.optimizer.lr == lr, (experiment, method)


def test_default_targets_live_once():
    for method in ("oft", "lora", "full"):
        cfg = compose_train([f"method={method}"])
        assert cfg.adapter.targets is None  # the configs defer to the one list
        assert instantiate(cfg.adapter).targets == list(DEFAULT_TARGETS)


def test_an_experiment_composed_last_overrides_a_methods_task_settings(tmp_path):
    # task_method/subject_coft.yaml sets lr 1e-3 and eps 2.5e-3; an experiment that says
    # otherwise must win (it used to be composed before task_method).
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "probe.yaml").write_text(
        "# @package _global_\ndefaults:\n  - dreambooth\nmodule:\n  optimizer:\n    lr: 0.123\n"
        "adapter:\n  eps: 0.05\n")
    cfg = compose_train(["experiment=probe", "method=coft"], conf)
    assert cfg.module.optimizer.lr == 0.123 and cfg.adapter.eps == 0.05
    assert compose_train(["experiment=dreambooth", "method=coft"]).module.optimizer.lr == 1e-3


def test_the_papers_coft_settings_are_in_the_paper_convention():
    for control in ("canny", "seg", "depth", "landmarks"):
        cfg = compose_train([f"experiment={control}_sd15"])  # method=coft, the default
        assert (cfg.adapter.coft_norm, cfg.adapter.eps, cfg.module.optimizer.lr) == ("paper", 1e-3, 1e-5)
    cfg = compose_train(["experiment=dreambooth_sd15", "data.root=/photos", "data.subject=dog"])
    assert (cfg.adapter.coft_norm, cfg.adapter.eps, cfg.module.optimizer.lr) == ("paper", 6e-5, 6e-5)
    assert cfg.module.num_class_images == 200 and cfg.adapter.num_blocks == 4
    cfg = compose_train(["experiment=dreambooth"])  # the paper convention, scale-matched on the tiny SD
    assert (cfg.adapter.coft_norm, cfg.adapter.eps) == ("paper", 2.5e-3)
    cfg = compose_train(["experiment=dreambooth", "method=coft_rotation"])  # the tiny SD's measured rotation bound
    assert (cfg.adapter.coft_norm, cfg.adapter.eps, cfg.module.optimizer.lr) == ("rotation", 0.2, 1e-3)


def test_the_tiny_subject_coft_eps_is_scale_matched_to_the_papers_dreambooth_eps():
    import torch

    from orthodiff.models.tiny_sd import build_unet
    from orthodiff.oft.scale import layer_widths, scale_matched_eps
    from orthodiff.reproduce.params import sd15_unet

    with torch.device("meta"):
        reference, widths = (layer_widths(unet, DEFAULT_TARGETS) for unet in (sd15_unet(), build_unet(latent_channels=8)))
    paper = OmegaConf.load(CONF / "model_task_method" / "sd15_subject_coft.yaml").adapter.eps
    tiny = OmegaConf.load(CONF / "task_method" / "subject_coft.yaml").adapter.eps
    assert paper == 6e-5 and tiny == pytest.approx(scale_matched_eps(widths, reference, reference_eps=paper), rel=0.02)


def test_model_configs_carry_no_method_settings():
    methods = {p.stem for p in (CONF / "method").glob("*.yaml")} | {"adapter", "module", "method"}
    for path in (CONF / "model").glob("*.yaml"):
        for key in OmegaConf.load(path):  # e.g. `subject_coft:`, a method's setting for one task
            assert key not in methods and not key.startswith(("subject_", "control_")), (path, key)


def test_the_methods_learning_rate_reaches_the_module():
    cfg = compose_train(["experiment=canny", "method=lora", "method.tiny_control_lr=3e-4"])
    module = instantiate(cfg.module)
    optimizer = module.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == 3e-4
    assert isinstance(module.adapter_config, LoRAConfig)
