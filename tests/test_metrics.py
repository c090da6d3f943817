import warnings

import numpy as np
import pytest
from PIL import Image

from segnet import metrics as m

KEYS = ("MaxF", "AP", "PRE", "REC", "FPR", "FNR", "IoU", "ACC", "BestThresh")


@pytest.fixture
def sample(kitti_sample):
    return kitti_sample / "training"


# -----------------------------------------------------------------------------
# the kit, literally: our own reference code following devkit_road's evalExp / pxEval_maximizeFMeasure


def kit_counts(prob_u8, valid, road):
    p = prob_u8.astype("f4") / 255  # as the kit reads the PNG: float32
    thresh = np.array(range(256)) / 255.0  # float64
    fn = np.array([np.sum((p < t) & road & valid) for t in thresh])
    fp = np.array([np.sum((p >= t) & ~road & valid) for t in thresh])
    return fn, fp, int(np.sum(road & valid)), int(np.sum(~road & valid))


def kit_counts_histogram(prob_u8, valid, road):
    """The kit's own formulation: np.histogram over [-inf, t_0, ..., t_255, inf], then cumulative sums."""
    p = prob_u8.astype("f4") / 255
    edges = np.concatenate(([-np.inf], np.array(range(256)) / 255.0, [np.inf]))
    fn = np.cumsum(np.histogram(p[road & valid], bins=edges)[0])[:256]
    fp = np.flipud(np.cumsum(np.flipud(np.histogram(p[~road & valid], bins=edges)[0])))[1:257]
    return fn, fp


def kit_scores(pos, neg, fn, fp):
    thresh = np.array(range(256)) / 255.0
    tp, tn = pos - fn.astype(float), neg - fp.astype(float)
    recall = tp / float(pos)
    precision = tp / (tp + fp + 1e-10)
    drop = (recall == 0) & (precision == 0)
    recall, precision = recall[~drop], precision[~drop]
    ap = 0
    for r in np.arange(0, 1.1, 0.1):
        ap += max(precision[np.where(recall >= r)])
    ap /= 11
    f = (1 + 1.0) * (precision * recall) / ((1.0 * precision) + recall + 1e-10)
    k = f.argmax()
    TP, TN, FP, FN = tp[~drop][k], tn[~drop][k], fp[~drop][k], fn[~drop][k]
    return {
        "MaxF": 100 * f[k],
        "AP": 100 * ap,
        "PRE": 100 * TP / (TP + FP),
        "REC": 100 * TP / (TP + FN),
        "FPR": 100 * FP / (TN + FP),
        "FNR": 100 * FN / (TP + FN),
        "IoU": 100 * TP / (TP + FP + FN),
        "ACC": 100 * (TP + TN) / (TP + TN + FP + FN),
        "BestThresh": thresh[~drop][k],
    }


def random_image(rng, shape, quality=0.6):
    """A map that prefers road pixels, so the curve has a real shape, and hits all 256 values."""
    road = rng.random(shape) < 0.35
    valid = rng.random(shape) < 0.9
    p = np.clip(quality * road + (1 - quality) * rng.random(shape) + rng.normal(0, 0.15, shape), 0, 1)
    prob = m.to_uint8_prob(p)
    prob.flat[:256] = np.arange(256)
    return prob, valid, road


# -----------------------------------------------------------------------------
# counting and scoring


def test_float32_probability_never_lands_below_its_own_threshold():
    """float32(v)/255 >= v/255 (float64) for every 8-bit v, so 'v >= i' is the kit's comparison, exactly."""
    p = np.arange(256, dtype=np.uint8).astype(np.float32) / 255
    assert p.dtype == np.float32
    kit = p[:, None] >= m.THRESH[None, :]
    v, i = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    np.testing.assert_array_equal(kit, v >= i)
    assert m.THRESH.dtype == np.float64 and m.THRESH[255] == 1.0


def test_hand_computed_2x3():
    # valid road values 255, 128, 200 (P = 3); valid non-road 0, 150 (N = 2); 50 is outside the valid area.
    #   i = 0        TP 3 FP 2  PRE 3/5  REC 1    F 0.75
    #   i = 1..128   TP 3 FP 1  PRE 3/4  REC 1    F 6/7   <- MaxF, first reached at i = 1
    #   i = 129..150 TP 2 FP 1  PRE 2/3  REC 2/3  F 2/3
    #   i = 151..200 TP 2 FP 0  PRE 1    REC 2/3  F 0.8
    #   i = 201..255 TP 1 FP 0  PRE 1    REC 1/3  F 0.5
    # AP: levels r = 0 .. 0.6 reach PRE 1 (REC 2/3 >= r), r = 0.7 .. 1.0 only REC 1 (PRE 3/4):
    #   (7 + 4 * 3/4) / 11 = 10/11
    # At i = 1: FPR 1/2, FNR 0, IoU 3/4, ACC (3 + 1) / 5.
    prob = np.array([[255, 128, 0], [200, 150, 50]], np.uint8)
    road = np.array([[1, 1, 0], [1, 0, 0]], bool)
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
    c = m.image_counts(prob, valid, road)
    assert (c.pos, c.neg) == (3, 2)
    assert c.fn[0] == 0 and c.fn[128] == 0 and c.fn[129] == 1 and c.fn[201] == 2 and c.fn[255] == 2
    assert c.fp[0] == 2 and c.fp[1] == 1 and c.fp[150] == 1 and c.fp[151] == 0
    s = m.scores(c)
    assert s["MaxF"] == pytest.approx(100 * 6 / 7, abs=1e-6)
    assert s["AP"] == pytest.approx(100 * 10 / 11, abs=1e-6)
    assert s["BestThresh"] == 1 / 255
    expected = {"PRE": 75, "REC": 100, "FPR": 50, "FNR": 0, "IoU": 75, "ACC": 80}
    assert {k: s[k] for k in expected} == pytest.approx(expected)
    pre, rec, th = m.pr_curve(c)
    assert len(pre) == len(rec) == len(th) == 256 and rec[0] == 1 and pre[-1] == pytest.approx(1)


def test_ap_uses_the_kits_recall_levels():
    """np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004, so a recall of exactly 0.3 does not reach it."""
    # 10 road pixels: 3 at 200, 7 at 50; 10 non-road at 100.
    #   i = 0..50: PRE 1/2, REC 1;  i = 51..100: PRE 3/13, REC 0.3;  i = 101..200: PRE 1, REC 0.3
    # AP = (3 levels at PRE 1 + 8 levels at PRE 1/2) / 11 = 7/11 (7.5/11 with a level of exactly 0.3)
    prob = np.array([[200] * 3 + [50] * 7 + [100] * 10], np.uint8)
    road = np.array([[True] * 10 + [False] * 10])
    s = m.scores(m.image_counts(prob, np.ones_like(road), road))
    assert s["AP"] == pytest.approx(100 * 7 / 11, abs=1e-6)


def test_matches_a_literal_per_threshold_reference_on_random_maps():
    rng = np.random.default_rng(0)
    images = [random_image(rng, (40, 60 + 7 * k), quality=0.3 + 0.1 * k) for k in range(4)]
    total, fn, fp, pos, neg = m.Counts(), 0, 0, 0, 0
    for prob, valid, road in images:
        c = m.image_counts(prob, valid, road)
        kfn, kfp, kpos, kneg = kit_counts(prob, valid, road)
        hfn, hfp = kit_counts_histogram(prob, valid, road)
        np.testing.assert_array_equal(c.fn, kfn)
        np.testing.assert_array_equal(c.fp, kfp)
        np.testing.assert_array_equal(hfn, kfn)  # the reference agrees with the kit's histogram form
        np.testing.assert_array_equal(hfp, kfp)
        assert (c.pos, c.neg) == (kpos, kneg)
        assert c.fn.dtype == c.fp.dtype == np.int64
        total, fn, fp, pos, neg = total + c, fn + kfn, fp + kfp, pos + kpos, neg + kneg
    ours, kit = m.scores(total), kit_scores(pos, neg, fn, fp)
    for k in ("MaxF", "AP", "BestThresh"):
        assert ours[k] == kit[k], k  # bit for bit
    assert {k: ours[k] for k in KEYS} == pytest.approx(kit, rel=1e-12)
    assert 0 < ours["BestThresh"] < 1 and 50 < ours["MaxF"] < 100


def test_pooling_is_by_pixels_not_by_image_mean():
    good = (np.array([[255, 255, 0, 0]], np.uint8), np.ones((1, 4), bool), np.array([[1, 1, 0, 0]], bool))
    rng = np.random.default_rng(1)
    bad = random_image(rng, (1, 400), quality=0.0)
    a, b = m.image_counts(*good), m.image_counts(*bad)
    pooled = m.scores(a + b)
    joined = m.scores(m.image_counts(*(np.concatenate([x, y], axis=1) for x, y in zip(good, bad, strict=True))))
    assert pooled == joined
    mean = (m.scores(a)["MaxF"] + m.scores(b)["MaxF"]) / 2
    assert abs(pooled["MaxF"] - mean) > 10
    total = sum([a, b])  # sum() works, starting from 0
    assert np.array_equal(total.fn, a.fn + b.fn) and np.array_equal(total.fp, a.fp + b.fp)
    assert (total.pos, total.neg) == (a.pos + b.pos, a.neg + b.neg)


@pytest.mark.filterwarnings("error")
def test_edge_cases_are_finite_and_warning_free():
    rng = np.random.default_rng(2)
    prob = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    ones, zeros = np.ones((20, 30), bool), np.zeros((20, 30), bool)

    none = m.scores(m.image_counts(prob, ones, zeros))  # no road: every threshold dropped
    assert none["MaxF"] == none["AP"] == none["REC"] == none["FNR"] == none["BestThresh"] == 0
    assert none["FPR"] == 100 and len(m.pr_curve(m.image_counts(prob, ones, zeros))[0]) == 0

    road = m.scores(m.image_counts(prob, ones, ones))  # no non-road: perfect at t = 0
    assert road["MaxF"] == pytest.approx(100) and road["FPR"] == 0 and road["ACC"] == 100
    assert road["BestThresh"] == 0

    empty = m.scores(m.Counts())
    assert set(empty) == set(KEYS) and all(v == 0 for v in empty.values())

    half = rng.random((20, 30)) < 0.4
    for value in (0, 77, 255):  # a constant map: the curve is one point, kept up to t_value
        c = m.image_counts(np.full((20, 30), value, np.uint8), ones, half)
        s = m.scores(c)
        pre = half.sum() / half.size
        assert len(m.pr_curve(c)[0]) == value + 1
        assert s["BestThresh"] == 0 and s["REC"] == 100 and s["PRE"] == pytest.approx(100 * pre)
        assert s["MaxF"] == pytest.approx(100 * 2 * pre / (pre + 1))
        assert s["AP"] == pytest.approx(100 * pre)
    assert (m.image_counts(np.full((2, 2), 255, np.uint8), ones[:2, :2], ones[:2, :2]).fn == 0).all()
    assert all(np.isfinite(v) for s in (none, road, empty) for v in s.values())


def test_to_uint8_prob_and_gt_masks():
    np.testing.assert_array_equal(
        m.to_uint8_prob(np.array([-0.1, 0, 0.4 / 255, 0.6 / 255, 0.5, 1, 1.2])), [0, 0, 0, 1, 128, 255, 255]
    )
    gt = np.array([[[255, 0, 255], [255, 0, 0], [0, 0, 0], [0, 0, 255]]], np.uint8)
    valid, road = m.gt_masks(gt)
    np.testing.assert_array_equal(valid, [[True, True, False, False]])
    c = m.image_counts(np.full((1, 4), 200, np.uint8), valid, road)
    assert (c.pos, c.neg) == (1, 1)  # road outside the valid area does not count
    with pytest.raises(TypeError):
        m.image_counts(np.zeros((1, 4)), valid, road)


def test_category_of():
    assert m.category_of("um_000012.png") == "um_road"
    assert m.category_of("um_road_000012.png") == "um_road"
    assert m.category_of("umm_000003.png") == "umm_road"
    assert m.category_of("/x/y/uu_road_000097.png") == "uu_road"
    assert m.category_of("um_lane_000012.png") == "um_lane"
    for bad in ("foo_000001.png", "um_lane.png", "umm_lane_000001.png", "um_road_x.png"):
        with pytest.raises(ValueError):
            m.category_of(bad)


# -----------------------------------------------------------------------------
# bird's-eye view

F, CX, CY, CAM_H = 700.0, 600.0, 180.0, 1.6  # a synthetic camera 1.6 m above a flat road, 375 x 1242 image


def synthetic_calib(path, cam_h=CAM_H):
    """A KITTI calib file for the synthetic camera (x right, y down, z ahead; the road at y = +cam_h)."""
    P2 = [F, 0, CX, 0, 0, F, CY, 0, 0, 0, 1, 0]
    R0 = [1, 0, 0, 0, 1, 0, 0, 0, 1]
    Tr = [1, 0, 0, 0, 0, 1, 0, -cam_h, 0, 0, 1, 0]
    fmt = lambda xs: " ".join(f"{x:.12e}" for x in xs)  # noqa: E731
    lines = [f"P0: {fmt(P2)}", f"P2: {fmt(P2)}", f"R0_rect: {fmt(R0)}", f"Tr_velo_to_cam: {fmt(Tr)}"]
    path.write_text("\n".join([*lines, f"Tr_cam_to_road: {fmt(Tr)}", ""]))
    return path


def pinhole(x, z):
    """Where the road point (x, 0, z) lands in the synthetic camera: (u, v), as the kit reads them."""
    return CX + F * x / z, CY + F * CAM_H / z


def cell_centre(r, c):
    return -10 + 0.05 * (c + 0.5), 46 - 0.05 * (r + 0.5)


def index_images(h=375, w=1242):
    rows, cols = np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")
    return rows.astype(np.int32), cols.astype(np.int32)  # 1-based so that 0 means "outside"


def test_read_calib_and_homography(tmp_path):
    calib = m.read_calib(synthetic_calib(tmp_path / "um_000000.txt"))
    assert calib["P2"].shape == (3, 4) and calib["R0_rect"].shape == (3, 3)
    assert calib["Tr_cam_to_road"].shape == calib["Tr_velo_to_cam"].shape == (3, 4)
    # (x, 0, z) -> camera (x, 1.6, z) -> (F x + CX z, F 1.6 + CY z, z)
    expected = np.array([[F, CX, 0], [0, CY, F * CAM_H], [0, 1, 0]])
    np.testing.assert_allclose(m.bev_homography(calib), expected, atol=1e-9)


def test_bev_cell_reads_the_pixel_its_centre_projects_to(tmp_path):
    H = m.bev_homography(m.read_calib(synthetic_calib(tmp_path / "c.txt")))
    rows, cols = index_images()
    bev_r, bev_c = m.to_bev(rows, H), m.to_bev(cols, H)
    assert bev_r.shape == (800, 400) and bev_r.dtype == np.int32
    for r, c in [(700, 250), (799, 200), (0, 199), (400, 100), (123, 321)]:
        u, v = pinhole(*cell_centre(r, c))
        assert (bev_r[r, c], bev_c[r, c]) == (int(np.floor(v)), int(np.floor(u))), (r, c)
    # and back: an image point, lifted onto the road, lands in a cell that reads a pixel within the
    # projection of that cell (the bounding box of its four corners)
    for u, v in [(700.3, 250.7), (420.9, 330.2), (800.5, 215.3)]:
        z = F * CAM_H / (v - CY)
        x = (u - CX) * z / F
        r, c = int((46 - z) / 0.05), int((x + 10) / 0.05)
        us, vs = pinhole(*np.meshgrid(-10 + 0.05 * np.array([c, c + 1]), 46 - 0.05 * np.array([r, r + 1])))
        assert np.floor(us.min()) <= bev_c[r, c] <= np.floor(us.max()), (u, v)
        assert np.floor(vs.min()) <= bev_r[r, c] <= np.floor(vs.max()), (u, v)
    # the grid: x grows to the right, z falls downwards (far at the top)
    assert bev_c[700, 300] > bev_c[700, 100] and bev_r[700, 200] > bev_r[100, 200]


def test_bev_outside_the_image_is_zero(tmp_path):
    H = m.bev_homography(m.read_calib(synthetic_calib(tmp_path / "c.txt")))
    bev = m.to_bev(np.full((375, 1242, 3), 255, np.uint8), H)
    assert bev.shape == (800, 400, 3)
    r, c = np.meshgrid(np.arange(800), np.arange(400), indexing="ij")
    x, z = cell_centre(r, c)
    u, v = pinhole(x, z)
    inside = (u >= 1) & (u <= 1242) & (v >= 1) & (v <= 375)
    assert 0.5 < inside.mean() < 0.99
    np.testing.assert_array_equal(bev[..., 0] == 255, inside)
    assert (bev[~inside] == 0).all()
    assert bev[799, 0, 0] == bev[799, 399, 0] == 0 and bev[0, 200, 0] == 255


def test_bev_of_a_real_ground_truth_has_the_road_ahead(sample):
    H = m.bev_homography(m.read_calib(sample / "calib" / "um_000000.txt"))
    gt = np.asarray(Image.open(sample / "gt_image_2" / "um_road_000000.png").convert("RGB"))
    valid, road = m.gt_masks(m.to_bev(gt, H))
    assert road[700:790, 140:220].mean() > 0.9  # the lane the car stands on, just ahead
    assert road[:, 300:].mean() == 0 and valid[:, 300:].mean() > 0.9  # the right side: valid, not road
    assert not valid[799, 0] and not valid[799, 399]  # bottom corners fall outside the image
    # a road pixel of the image, lifted onto the road plane, lands in a road cell
    Hinv = np.linalg.inv(H)
    x, z, w = Hinv @ np.array([600.0, 350.0, 1.0])  # 1-based (u, v) near the bottom centre
    r, c = int((46 - z / w) / 0.05), int((x / w + 10) / 0.05)
    assert road[r, c] and m.gt_masks(gt)[1][349, 599]


# -----------------------------------------------------------------------------
# folders


def write_folder(tmp_path, rng):
    gt_dir, prob_dir, calib_dir = (tmp_path / d for d in ("gt", "prob", "calib"))
    for d in (gt_dir, prob_dir, calib_dir):
        d.mkdir()
    arrays = {}
    names = ["um_road_000000", "um_road_000001", "umm_road_000000", "uu_road_000007", "um_lane_000000"]
    for k, name in enumerate(names):
        prob, valid, road = random_image(rng, (375, 1242), quality=0.2 + 0.15 * k)
        if "lane" in name:
            prob = 255 - prob  # a very different category, so pooling it in would show
        gt = np.zeros((375, 1242, 3), np.uint8)
        gt[..., 0], gt[..., 2] = 255 * valid, 255 * road
        Image.fromarray(gt).save(gt_dir / f"{name}.png")
        Image.fromarray(prob).save(prob_dir / f"{name}.png")
        stem = f"{name.split('_')[0]}_{name.split('_')[-1]}"
        calib = synthetic_calib(calib_dir / f"{stem}.txt", cam_h=1.5 + 0.1 * (k % 2))  # two cameras
        arrays[name] = (prob, gt, m.bev_homography(m.read_calib(calib)))
    return gt_dir, prob_dir, calib_dir, arrays


def pool(counts, prefix):
    return sum(c for name, c in counts.items() if name.startswith(prefix))


def test_evaluate_folder_perspective_and_bev(tmp_path):
    gt_dir, prob_dir, calib_dir, arrays = write_folder(tmp_path, np.random.default_rng(3))
    for space in ("perspective", "bev"):
        counts = {}
        for name, (prob, gt, H) in arrays.items():
            if space == "bev":
                prob, gt = m.to_bev(prob, H), m.to_bev(gt, H)
            counts[name] = m.image_counts(prob, *m.gt_masks(gt))
        expected = {
            "um_road": m.scores(pool(counts, "um_road")),
            "umm_road": m.scores(pool(counts, "umm_road")),
            "uu_road": m.scores(pool(counts, "uu_road")),
            "um_lane": m.scores(pool(counts, "um_lane")),
            "URBAN_ROAD": m.scores(sum(pool(counts, c) for c in ("um_road", "umm_road", "uu_road"))),
        }
        results = m.evaluate_folder(prob_dir, gt_dir, calib_dir, space=space)
        assert results == expected, space
        assert results["URBAN_ROAD"] != m.scores(sum(counts.values()))  # the lane task stays out
        table = m.format_table(results)
        assert all(cat in table for cat in expected) and "MaxF" in table and "BestThresh" in table
        assert len({len(line) for line in table.splitlines()}) == 1  # aligned
        if space == "perspective":
            perspective = results
    assert results["um_road"] != perspective["um_road"]


def test_evaluate_folder_names_a_missing_map(tmp_path):
    gt_dir, prob_dir, calib_dir, _ = write_folder(tmp_path, np.random.default_rng(4))
    (prob_dir / "umm_road_000000.png").unlink()
    with pytest.raises(ValueError, match="umm_road_000000.png"):
        m.evaluate_folder(prob_dir, gt_dir)
    with pytest.raises(ValueError, match="calib_dir"):
        m.evaluate_folder(prob_dir, gt_dir, space="bev")
    (gt_dir / "umm_road_000000.png").unlink()
    (calib_dir / "uu_000007.txt").unlink()
    with pytest.raises(ValueError, match="uu_000007.txt"):
        m.evaluate_folder(prob_dir, gt_dir, calib_dir, space="bev")


def test_evaluate_folder_on_real_ground_truth(sample, tmp_path):
    """Ground truth scored against itself as a map: perfect, in both spaces, with no warnings."""
    gt_dir, prob_dir = tmp_path / "gt", tmp_path / "prob"
    gt_dir.mkdir(), prob_dir.mkdir()
    for path in sorted((sample / "gt_image_2").glob("*.png")):
        parts = path.stem.split("_")
        if not (sample / "calib" / f"{parts[0]}_{parts[-1]}.txt").is_file():
            continue  # the sample lacks a few calib files; BEV needs one per image
        (gt_dir / path.name).symlink_to(path)
        road = m.gt_masks(np.asarray(Image.open(path).convert("RGB")))[1]
        Image.fromarray(255 * road.astype(np.uint8)).save(prob_dir / path.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for space in ("perspective", "bev"):
            results = m.evaluate_folder(prob_dir, gt_dir, sample / "calib", space=space)
            assert {"um_road", "umm_road", "uu_road", "um_lane", "URBAN_ROAD"} <= set(results)
            for s in results.values():
                assert s["MaxF"] == pytest.approx(100) and s["FPR"] == 0 and s["BestThresh"] > 0
