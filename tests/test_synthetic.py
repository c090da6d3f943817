"""The synthetic dataset: KITTI's layout and colours, deterministic, and geometrically consistent."""

import numpy as np
import pytest
from PIL import Image

from segnet import data, metrics
from segnet.data import synthetic

SIZE = dict(height=48, width=160)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "road", num_train=12, num_test=3, seed=0, **SIZE)


def test_kitti_layout_and_colours(root):
    names = sorted(p.name for p in (root / "training" / "image_2").iterdir())
    assert names[:2] == ["um_000000.png", "um_000001.png"] and len(names) == 12
    assert {n[:3] for n in names} == {"um_", "umm", "uu_"}
    assert len(list((root / "testing" / "image_2").iterdir())) == 3
    assert len(list((root / "training" / "calib").glob("*.txt"))) == 12
    ignored = 0
    for name in names:
        cat, idx = name[:-4].rsplit("_", 1)
        image = np.asarray(Image.open(root / "training" / "image_2" / name))
        gt = np.asarray(Image.open(root / "training" / "gt_image_2" / f"{cat}_road_{idx}.png"))
        assert image.shape == gt.shape == (48, 160, 3) and image.dtype == np.uint8
        colours = {tuple(c) for c in np.unique(gt.reshape(-1, 3), axis=0)}
        assert colours <= {(255, 0, 255), (255, 0, 0), (0, 0, 0)}
        assert {(255, 0, 255), (255, 0, 0)} <= colours  # every scene has road and non-road
        ignored += (0, 0, 0) in colours
    assert 0 < ignored < len(names)  # some images have an area outside the evaluation, not all


def test_the_loader_reads_it_like_kitti(root):
    samples = data.list_samples(root, "training", ["um", "umm", "uu"], "road")
    assert len(samples) == 12 and {s.category for s in samples} == {"um", "umm", "uu"}
    label = data.read_label(samples[0].gt)
    assert set(np.unique(label)) <= {0, 1, data.IGNORE}


def test_same_seed_same_bytes_and_an_image_does_not_depend_on_the_count(root, tmp_path):
    again = synthetic.generate(tmp_path / "again", num_train=6, num_test=0, seed=0, **SIZE)
    other = synthetic.generate(tmp_path / "other", num_train=6, num_test=0, seed=1, **SIZE)
    for name in ("um_000000.png", "uu_000001.png"):
        a = (root / "training" / "image_2" / name).read_bytes()
        assert (again / "training" / "image_2" / name).read_bytes() == a
        assert (other / "training" / "image_2" / name).read_bytes() != a


def test_generated_once_regenerated_when_parameters_change(tmp_path):
    root = synthetic.generate(tmp_path / "d", num_train=3, num_test=0, seed=0, **SIZE)
    first = root / "training" / "image_2" / "um_000000.png"
    stamp = first.stat().st_mtime_ns
    synthetic.generate(root, num_train=3, num_test=0, seed=0, **SIZE)
    assert first.stat().st_mtime_ns == stamp  # nothing rewritten
    synthetic.generate(root, num_train=6, num_test=0, seed=0, **SIZE)
    assert len(list((root / "training" / "image_2").iterdir())) == 6
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary folder left behind


def test_never_overwrites_a_dataset_it_did_not_write(tmp_path):
    (tmp_path / "real" / "training" / "image_2").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="synthetic.json"):
        synthetic.generate(tmp_path / "real", num_train=3, num_test=0, seed=0, **SIZE)
    assert (tmp_path / "real" / "training" / "image_2").is_dir()


@pytest.mark.parametrize("i,category", enumerate(["um", "umm", "uu", "um", "umm", "uu"]))
def test_calibration_agrees_with_the_ground_truth(i, category, tmp_path):
    """Bird's-eye view through the calib file we write puts the road where the scene model has it."""
    rng = np.random.default_rng([5, i])
    s = synthetic.scene(rng, category, height=96, width=320)
    s.update(objects=[], ignore=None, carriageway=None)  # nothing hides the road
    _, label = synthetic.render(s, rng)
    (tmp_path / "calib.txt").write_text(synthetic.calib_text(s))
    H = metrics.bev_homography(metrics.read_calib(tmp_path / "calib.txt"))
    bev = metrics.to_bev(label.astype(int) + 1, H)  # 0 = outside the image, 1 non-road, 2 road
    x, z = metrics.bev_grid()
    seen = (bev > 0) & (z < 25)  # farther away a pixel spans metres
    assert seen.sum() > 50_000
    expected = synthetic.road_region(s, x, z)[seen]
    assert np.mean((bev[seen] == 2) == expected) > 0.95
