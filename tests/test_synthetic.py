"""The synthetic dataset: KITTI's layout and colours, deterministic, and geometrically consistent."""

import json

import numpy as np
import pytest
from PIL import Image

from segnet import data, metrics
from segnet.data import synthetic

SIZE = dict(height=48, width=160)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "road", num_train=12, num_test=3, seed=0, **SIZE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The same scenes as root, as images and masks of the six classes."""
    path = tmp_path_factory.mktemp("syn") / "classes"
    return synthetic.generate(path, num_train=12, num_test=3, seed=0, layout="folder", **SIZE)


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


@pytest.mark.parametrize("layout,images", [("kitti", "training/image_2"), ("folder", "images")])
def test_generated_once_regenerated_when_parameters_change(layout, images, tmp_path):
    root = synthetic.generate(tmp_path / "d", num_train=3, num_test=0, seed=0, layout=layout, **SIZE)
    first = root / images / "um_000000.png"
    stamp = first.stat().st_mtime_ns
    synthetic.generate(root, num_train=3, num_test=0, seed=0, layout=layout, **SIZE)
    assert first.stat().st_mtime_ns == stamp  # nothing rewritten
    synthetic.generate(root, num_train=6, num_test=0, seed=0, layout=layout, **SIZE)
    assert len(list((root / images).iterdir())) == 6
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary folder left behind


@pytest.mark.parametrize("layout,folder", [("kitti", "training/image_2"), ("folder", "images"), ("folder", "masks")])
def test_never_overwrites_a_dataset_it_did_not_write(layout, folder, tmp_path):
    (tmp_path / "real" / folder).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="synthetic.json"):
        synthetic.generate(tmp_path / "real", num_train=3, num_test=0, seed=0, layout=layout, **SIZE)
    assert (tmp_path / "real" / folder).is_dir()


def test_folder_layout_same_scenes_as_kitti_with_six_classes(root, folder):
    names = sorted(p.name for p in (root / "training" / "image_2").iterdir())
    assert sorted(p.name for p in (folder / "images").iterdir()) == names
    assert sorted(p.name for p in (folder / "masks").iterdir()) == names
    assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(
        p.name for p in (root / "testing" / "image_2").iterdir()
    )
    for name in names:
        assert (folder / "images" / name).read_bytes() == (root / "training" / "image_2" / name).read_bytes()
    # The kitti marker is as it always was, so datasets already on disk are not regenerated.
    params = dict(version=synthetic.VERSION, num_train=12, num_test=3, seed=0, **SIZE)
    assert json.loads((root / "synthetic.json").read_text()) == params
    assert json.loads((folder / "synthetic.json").read_text()) == dict(params, layout="folder")

    seen = set()
    for name in names:
        mask = Image.open(folder / "masks" / name)
        assert mask.mode == "L" and mask.size == (160, 48)
        mask = np.asarray(mask)
        values = set(np.unique(mask).tolist())
        assert values <= {*range(len(synthetic.CLASSES)), data.IGNORE}
        seen |= values
        cat, idx = name[:-4].rsplit("_", 1)
        kitti = data.read_label(root / "training" / "gt_image_2" / f"{cat}_road_{idx}.png")
        road = np.isin(mask, [synthetic.ROAD, synthetic.LANE])
        assert np.array_equal(np.where(mask == data.IGNORE, data.IGNORE, road), kitti)
    assert seen == {*range(6), data.IGNORE}  # every class somewhere in a dozen scenes


@pytest.mark.parametrize("i,category", enumerate(["um", "umm"]))
def test_lane_markings_lie_on_the_main_road(i, category):
    rng = np.random.default_rng([7, i])
    s = synthetic.scene(rng, category, height=96, width=320)
    s.update(objects=[], ignore=None, carriageway=None, zebra=12.0, paint_wear=1.0)
    _, label = synthetic.render(s, rng)
    dx, dy, dz = synthetic.rays(s)
    t = s["cam_height"] / np.maximum(dy, 1e-6)
    x, z = t * dx, t * dz
    lat = synthetic.lateral(s, x, z)
    left, right = synthetic.road_edges(s, z)
    main = (dy > 1e-6) & (lat > left) & (lat < right)
    lane = label == synthetic.LANE
    assert lane.any() and not (lane & ~main).any()
    crossing = main & (np.abs(z - 12.0) < 1.4)  # the zebra's stripes cover about half of the road there
    assert 0.3 < lane[crossing].mean() < 0.8


@pytest.mark.parametrize("i,category", enumerate(["um", "umm", "uu", "um", "umm", "uu"]))
def test_calibration_agrees_with_the_ground_truth(i, category, tmp_path):
    """Bird's-eye view through the calib file we write puts the road where the scene model has it."""
    rng = np.random.default_rng([5, i])
    s = synthetic.scene(rng, category, height=96, width=320)
    s.update(objects=[], ignore=None, carriageway=None)  # nothing hides the road
    _, label = synthetic.render(s, rng)
    (tmp_path / "calib.txt").write_text(synthetic.calib_text(s))
    H = metrics.bev_homography(metrics.read_calib(tmp_path / "calib.txt"))
    bev = metrics.to_bev(synthetic.BINARY[label].astype(int) + 1, H)  # 0 = outside the image, 1 non-road, 2 road
    x, z = metrics.bev_grid()
    seen = (bev > 0) & (z < 25)  # farther away a pixel spans metres
    assert seen.sum() > 50_000
    expected = synthetic.road_region(s, x, z)[seen]
    assert np.mean((bev[seen] == 2) == expected) > 0.95
