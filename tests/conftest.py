import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

from segnet.config import compose  # noqa: E402, F401  (tests import it from here)

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
