import os
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

from segnet.config import compose  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KITTI_SAMPLE = ROOT.parent / "shared" / "kitti_road_sample"

# A tiny run of the real config: 18 synthetic 64x96 scenes, a 1/16-width FCN-8s, two short epochs.
TINY = [
    "dataset.synthetic.num_train=18",
    "dataset.synthetic.num_test=3",
    "dataset.synthetic.height=64",
    "dataset.synthetic.width=96",
    "dataset.train_size=[64,96]",
    "dataset.val_per_category=2",
    "model.width=0.0625",
    "trainer.epochs=2",
    "trainer.steps_per_epoch=2",
    "trainer.batch_size=4",
    "trainer.log_images=2",
]


def dataset_config(*overrides):
    """The dataset node of the real KITTI config, with overrides."""
    return compose(["dataset=kitti", *overrides]).dataset


def augment_overrides(*settings):
    """Overrides for an augmentation that does only what `settings` ask ("flip=true", "scale=[0.5,0.7]", ...)."""
    off = {
        "flip": "false",
        "scale": "[1.0,1.0]",
        "brightness": "0",
        "contrast": "0",
        "saturation": "0",
        "hue": "0",
        "shadow": "0",
    }
    off.update(s.split("=", 1) for s in settings)
    return [f"dataset.augment.{k}={v}" for k, v in off.items()]


def augment_config(*settings):
    return dataset_config(*augment_overrides(*settings)).augment


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """One tiny training run through the real Hydra config (TINY), shared by the train, infer and evaluate tests."""
    from segnet.train import train

    tmp = tmp_path_factory.mktemp("run")
    cfg = compose([*TINY, f"dataset.root={tmp / 'synthetic'}", f"outputs={tmp / 'outputs'}"])
    run_dir = tmp / "outputs" / "first"
    state = train(cfg, run_dir)
    return cfg, run_dir, state


@pytest.fixture
def kitti_sample():
    if not (KITTI_SAMPLE / "training" / "image_2").is_dir():
        pytest.skip(f"the real KITTI sample is not at {KITTI_SAMPLE} (it sits beside the repo in CI)")
    return KITTI_SAMPLE


@pytest.fixture(autouse=True)
def float32_after_each_test():
    """Training sets Keras' global precision policy; later tests must not inherit bfloat16 from it."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")
