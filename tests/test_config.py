"""The config: every value written once (in configs/), checked at composition, recipes per dataset."""

import dataclasses

import pytest
from conftest import compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from segnet import config


def schema_defaults(node, path=""):
    """Every field of the schema that holds a value of its own instead of MISSING."""
    out = []
    for f in dataclasses.fields(node):
        if f.default_factory is not dataclasses.MISSING:
            out += schema_defaults(f.default_factory, f"{path}{f.name}.")
        elif f.default != "???":
            out.append(path + f.name)
    return out


def test_the_schema_types_and_the_yaml_files_hold_every_value():
    assert schema_defaults(config.Config) == []
    assert schema_defaults(config.EvaluateConfig) == []
    for dataset in ("synthetic", "kitti"):
        for model in ("fcn8", "fcn16", "fcn32"):
            for name in ("config", "evaluate"):
                cfg = compose([f"dataset={dataset}", f"model={model}"], name=name)
                assert OmegaConf.missing_keys(cfg) == set(), (dataset, model, name)


def test_model_files_differ_only_in_the_name_and_recipes_come_from_the_dataset():
    fcn8, fcn16 = compose(["model=fcn8"]).model, compose(["model=fcn16"]).model
    assert fcn16.name == "fcn16" and {**fcn8, "name": "fcn16"} == dict(fcn16)
    demo, kitti = compose(["model=fcn32"]), compose(["dataset=kitti", "model=fcn32"])
    assert (demo.model.width, demo.trainer.epochs, demo.trainer.batch_size) == (0.25, 40, 8)
    assert (kitti.model.width, kitti.trainer.epochs, kitti.trainer.batch_size) == (0.5, 60, 4)
    assert compose(["dataset=kitti", "model.width=1.0"]).model.width == 1.0  # the command line wins


@pytest.mark.parametrize(
    "override",
    [
        "dataset.train_mode=crops",
        "dataset.cache=ram",
        "dataset.task=lanes",
        "trainer.precision=bf16",
        "trainer.strategy=mirror",
        "model.name=fcn4",
    ],
)
def test_a_closed_choice_outside_its_set_fails_when_the_config_is_composed(override):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert "expected one of" in str(e.value.__cause__)


def test_eval_keys_belong_to_evaluate_only():
    assert compose(["eval.space=bev"], name="evaluate").eval.space == "bev"
    with pytest.raises(ConfigCompositionException, match="eval.space=bevv"):
        compose(["eval.space=bevv"], name="evaluate")
    assert "unknown config key 'eval.space'" in config.check_overrides(["eval.space=bev"])
    assert config.check_overrides(["eval.space=bev"], config.EvaluateConfig) is None


def test_choices_read_and_print_as_their_strings():
    cfg = compose(["trainer.precision=float32"])
    assert cfg.trainer.precision == "float32" and f"{cfg.trainer.precision}" == "float32"
    assert str(cfg.model.name) == "fcn8"
