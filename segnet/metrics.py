"""The KITTI road benchmark's measures, computed the way its development kit (devkit_road) computes them.

Per image, only valid pixels count (ground truth RGB: valid = red > 0, road = blue > 0). The road probability
map is an 8-bit image; the kit reads it as p = float32(v) / 255 and uses 256 thresholds t_i = i / 255
(float64), a pixel being predicted road at threshold i when p >= t_i. Per threshold:

    FN_i = road pixels predicted non-road     FP_i = non-road pixels predicted road
    P = road pixels                           N = non-road pixels

FN, FP, P, N are summed over all images of a category (pixels pooled, not an average of per-image scores),
then TP = P - FN, TN = N - FP and

    REC = TP / P      PRE = TP / (TP + FP + 1e-10)      thresholds where both are 0 are dropped
    MaxF = max_i 2 PRE REC / (PRE + REC + 1e-10)        BestThresh = the first t_i that reaches it
    AP = mean over r in np.arange(0, 1.1, 0.1) of max PRE with REC >= r (0 if none)

and at BestThresh: PRE, REC, FPR = FP / N, FNR = FN / P, IoU = TP / (TP + FP + FN), ACC = (TP + TN) / (P + N).
All in percent except BestThresh. Categories um_road, umm_road, uu_road (um_lane for the lane task);
URBAN_ROAD pools the three road categories.

float32 finding: float32(v) / 255 rounds *up* for every v in 1..254 (v / 255 is a repeating 8-bit binary
pattern, so the bits cut off past float32's 24 always start with a 1) and is exact for 0 and 255, while
t_v is within a float64 ulp of v / 255. So no 8-bit value lands on the wrong side of its own threshold:
value v is predicted road exactly at thresholds i <= v, and one histogram of the 8-bit values plus cumulative
sums reproduce the kit's comparison exactly (tests/test_metrics.py checks all 256 x 256 cases and compares
against a literal per-threshold reference).

Bird's-eye view (the test server scores in BEV): 800 rows x 400 columns of 0.05 m cells, x from -10 to 10 m
(left to right), z from 46 m (top row) down to 6 m. As in the devkit's BirdsEyeView, cell centres are
x_j = -10 + 0.025 + 0.05 j and z_r = 46 - 0.025 - 0.05 r (built with np.arange, rounded to float32 like the
devkit), projected onto the image by H = (P2 R0_rect Tr_cam_to_road^-1)[:, [0, 2, 3]] applied to (x, z, 1).
The result (u, v) is read as 1-based: cells with 1 <= u <= width and 1 <= v <= height take the pixel at
(floor(v) - 1, floor(u) - 1), the rest are 0 (so outside the image is outside the valid area).

Where we deliberately differ from the kit (never for a well-formed benchmark run): the kit computes the
operating-point PRE/REC/FPR/FNR in float32 (we use float64, a difference below 1e-5 percentage points), and
it fails or returns NaN when a category has no road pixels; we return 0 for every ratio with a zero
denominator, and when every threshold is dropped we report MaxF = AP = 0 at BestThresh = 0.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segnet.errors import DatasetError

NUM_THRESH = 256
THRESH = np.arange(NUM_THRESH) / 255.0  # the kit's thresholds, float64
# the kit's AP recall levels, float quirks included: 0.30000000000000004, 0.6000000000000001, ...
RECALL_LEVELS = np.arange(0, 1.1, 0.1)
ROAD_CATEGORIES = ("um_road", "umm_road", "uu_road")
CATEGORIES = (*ROAD_CATEGORIES, "um_lane")

BEV_RES = 0.05
BEV_X = (-10.0, 10.0)  # metres, left to right
BEV_Z = (6.0, 46.0)  # metres, bottom row to top row
BEV_SHAPE = (800, 400)  # rows (z), columns (x)


# -----------------------------------------------------------------------------
# counting


def to_uint8_prob(prob: np.ndarray) -> np.ndarray:
    """Road probability in [0, 1] -> the 8-bit value a PNG of it stores: round(p * 255), clipped."""
    return np.clip(np.rint(np.asarray(prob, dtype=np.float64) * 255), 0, 255).astype(np.uint8)


def gt_masks(gt_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid, road) from a ground-truth RGB image, read as the kit reads it."""
    return gt_rgb[..., 0] > 0, gt_rgb[..., 2] > 0


@dataclass(eq=False)  # numpy fields: compare .fn/.fp with np.array_equal
class Counts:
    """FN_i and FP_i for the 256 thresholds, and the numbers of road (pos) and non-road (neg) pixels."""

    fn: np.ndarray = field(default_factory=lambda: np.zeros(NUM_THRESH, np.int64))
    fp: np.ndarray = field(default_factory=lambda: np.zeros(NUM_THRESH, np.int64))
    pos: int = 0
    neg: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.fn + other.fn, self.fp + other.fp, self.pos + other.pos, self.neg + other.neg)

    def __radd__(self, other):
        return self if other == 0 else NotImplemented  # so sum(list_of_counts) works


def image_counts(prob_u8: np.ndarray, valid: np.ndarray, road: np.ndarray) -> Counts:
    """Counts of one image: one histogram of road values, one of non-road values, cumulative sums."""
    if prob_u8.dtype != np.uint8:
        raise TypeError(f"image_counts wants the 8-bit map (see to_uint8_prob), got {prob_u8.dtype}")
    if not (prob_u8.shape == valid.shape == road.shape):
        raise ValueError(f"shapes differ: prob {prob_u8.shape}, valid {valid.shape}, road {road.shape}")
    valid, road = valid.astype(bool), road.astype(bool)
    pos_hist = np.bincount(prob_u8[valid & road], minlength=NUM_THRESH)
    neg_hist = np.bincount(prob_u8[valid & ~road], minlength=NUM_THRESH)
    # value v is predicted road exactly at thresholds i <= v (module docstring), so at threshold i
    # the misses are road values < i and the false alarms non-road values >= i
    fn = np.cumsum(pos_hist) - pos_hist
    fp = np.cumsum(neg_hist[::-1])[::-1]
    return Counts(fn.astype(np.int64), fp.astype(np.int64), int(pos_hist.sum()), int(neg_hist.sum()))


# -----------------------------------------------------------------------------
# scoring


def _ratio(a, b):
    """a / b, and 0 where b == 0 (no warnings, no NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def _curve(c: Counts):
    tp = c.pos - c.fn
    rec = _ratio(tp, c.pos)
    pre = tp / (tp + c.fp + 1e-10)
    keep = ~((rec == 0) & (pre == 0))
    return pre, rec, keep


def pr_curve(c: Counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """precision, recall and threshold values of the kept thresholds, for plotting."""
    pre, rec, keep = _curve(c)
    return pre[keep], rec[keep], THRESH[keep]


def scores_at(c: Counts, i: int) -> dict[str, float]:
    """The operating-point measures at threshold index i (p >= i / 255), in percent."""
    tp, fn = c.pos - c.fn[i], c.fn[i]
    fp, tn = c.fp[i], c.neg - c.fp[i]
    pre, rec = float(_ratio(tp, tp + fp)), float(_ratio(tp, c.pos))
    out = {
        "PRE": pre,
        "REC": rec,
        "F1": float(_ratio(2 * pre * rec, pre + rec)),
        "FPR": float(_ratio(fp, c.neg)),
        "FNR": float(_ratio(fn, c.pos)),
        "IoU": float(_ratio(tp, tp + fp + fn)),
        "ACC": float(_ratio(tp + tn, c.pos + c.neg)),
    }
    return {k: 100 * v for k, v in out.items()}


def scores(c: Counts) -> dict[str, float]:
    """MaxF, AP, and PRE, REC, FPR, FNR, IoU, ACC at BestThresh (percent; BestThresh in [0, 1])."""
    pre, rec, keep = _curve(c)
    pre, rec = pre[keep], rec[keep]
    if not keep.any():
        maxf, ap, best = 0.0, 0.0, 0
    else:
        f = 2 * pre * rec / (pre + rec + 1e-10)
        k = int(np.argmax(f))  # argmax returns the first maximum, as the kit's does
        # dropped thresholds are a suffix (TP only falls with the threshold), so kept index k is threshold k
        maxf, best = float(f[k]), int(np.flatnonzero(keep)[k])
        ap = float(np.mean([pre[rec >= r].max(initial=0.0) for r in RECALL_LEVELS]))
    at = scores_at(c, best)
    return {
        "MaxF": 100 * maxf,
        "AP": 100 * ap,
        **{k: at[k] for k in ("PRE", "REC", "FPR", "FNR", "IoU", "ACC")},
        "BestThresh": float(THRESH[best]),
    }


# -----------------------------------------------------------------------------
# more than two classes: the measures of semantic segmentation benchmarks (Pascal VOC, Cityscapes)


def confusion(label: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """n x n pixel counts, row the true class, column the predicted one; labels >= n (ignore) left out."""
    keep = label < n
    return np.bincount(n * label[keep].astype(np.int64) + pred[keep], minlength=n * n).reshape(n, n)


def class_scores(cm: np.ndarray, names) -> dict[str, float]:
    """IoU per class, mIoU (the mean over classes present in ground truth or prediction) and pixel accuracy,
    in percent, from a confusion matrix of pixels pooled over the images."""
    tp, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = _ratio(tp, union)
    return {
        "mIoU": 100 * float(iou[union > 0].mean()) if (union > 0).any() else 0.0,
        "PixelAcc": 100 * float(_ratio(tp.sum(), cm.sum())),
        **{f"IoU_{name}": 100 * float(v) for name, v in zip(names, iou, strict=True)},
    }


def format_class_table(cm: np.ndarray, names) -> str:
    """Per class: IoU, precision and recall (percent) and its share of the pixels; then mIoU and accuracy."""
    s, tp = class_scores(cm, names), np.diag(cm)
    pre, rec, share = 100 * _ratio(tp, cm.sum(0)), 100 * _ratio(tp, cm.sum(1)), 100 * _ratio(cm.sum(1), cm.sum())
    width = max(len("class"), *map(len, names))
    lines = [f"{'class':<{width}}" + "".join(f"{c:>9}" for c in ("IoU", "PRE", "REC", "pixels"))]
    for k, name in enumerate(names):
        row = (s[f"IoU_{name}"], pre[k], rec[k], share[k])
        lines.append(f"{name:<{width}}" + "".join(f"{v:>9.2f}" for v in row))
    lines.append(f"{'mean IoU':<{width}}{s['mIoU']:>9.2f}    pixel accuracy {s['PixelAcc']:.2f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# bird's-eye view


def read_calib(path) -> dict[str, np.ndarray]:
    """All matrices of a KITTI calib file: P0..P3 (3, 4), R0_rect (3, 3), Tr_* (3, 4), others flat."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if ":" not in line or line.lstrip().startswith("#"):
            continue
        key, values = line.split(":", 1)
        key, m = key.strip(), np.array(values.split(), dtype=np.float64)
        if key == "R0_rect":
            m = m.reshape(3, 3)
        elif (key.startswith("P") or key.startswith("Tr")) and m.size == 12:
            m = m.reshape(3, 4)
        out[key] = m
    return out


def bev_homography(calib: dict) -> np.ndarray:
    """H mapping a road-plane point (x, z, 1) to homogeneous 1-based image coordinates (u, v, 1)."""

    def pad(m):  # 3x3 or 3x4 -> 4x4 with a 1 in the corner
        out = np.eye(4)
        out[: m.shape[0], : m.shape[1]] = m
        return out

    P2 = np.asarray(calib["P2"], np.float64).reshape(3, 4)
    R0 = pad(np.asarray(calib["R0_rect"], np.float64).reshape(3, 3))
    Tr = pad(np.asarray(calib["Tr_cam_to_road"], np.float64).reshape(3, 4))
    return (P2 @ R0 @ np.linalg.inv(Tr))[:, [0, 2, 3]]


def bev_grid() -> tuple[np.ndarray, np.ndarray]:
    """(x, z) of every cell centre, each (800, 400): x grows along columns, z falls down the rows."""
    x = np.arange(BEV_X[0] + BEV_RES / 2, BEV_X[1], BEV_RES)
    z = np.arange(BEV_Z[1] - BEV_RES / 2, BEV_Z[0], -BEV_RES)
    assert (len(z), len(x)) == BEV_SHAPE
    X, Z = np.meshgrid(x, z)
    return X.astype(np.float32), Z.astype(np.float32)  # the devkit projects float32 cell centres


def bev_lookup(H: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each BEV cell: the image row and column it reads (0-based) and whether it lies inside the image."""
    X, Z = bev_grid()
    uvw = np.asarray(H, np.float64) @ np.stack([X.ravel(), Z.ravel(), np.ones(X.size)]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # w == 0: inf or nan, which fail the inside test
        u, v = uvw[0] / uvw[2], uvw[1] / uvw[2]
    inside = (u >= 1) & (u <= width) & (v >= 1) & (v <= height)
    # floor, as the devkit's cast to unsigned does for values >= 1; outside cells read (0, 0), then are zeroed
    rows = np.floor(np.where(inside, v, 1)).astype(np.int64) - 1
    cols = np.floor(np.where(inside, u, 1)).astype(np.int64) - 1
    return rows.reshape(BEV_SHAPE), cols.reshape(BEV_SHAPE), inside.reshape(BEV_SHAPE)


def to_bev(image: np.ndarray, H: np.ndarray, lookup=None) -> np.ndarray:
    """HxW or HxWxC image -> 800x400 (xC) bird's-eye view, nearest pixel, 0 outside the image.

    `lookup` (from bev_lookup) lets several images of one calib share the projection.
    """
    rows, cols, inside = lookup if lookup is not None else bev_lookup(H, *image.shape[:2])
    out = image[rows, cols]
    out[~inside] = 0
    return out


# -----------------------------------------------------------------------------
# folders


def category_of(name: str) -> str:
    """'um_000012.png' or 'um_road_000012.png' -> 'um_road'; 'um_lane_000012.png' -> 'um_lane'."""
    parts = Path(name).stem.split("_")
    kind = parts[1] if len(parts) == 3 else "road" if len(parts) == 2 else None
    cat = f"{parts[0]}_{kind}"
    if cat not in CATEGORIES or not parts[-1].isdigit():
        raise ValueError(f"{name!r} is not a KITTI road file name (um_000012.png, umm_road_000012.png, ...)")
    return cat


def _read_prob(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))  # the kit reads the map as 8-bit grey


def _read_gt(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def evaluate_folder(prob_dir, gt_dir, calib_dir=None, space="perspective", names=None) -> dict[str, dict[str, float]]:
    """Score the 8-bit maps in prob_dir (named like the ground truth, um_road_000000.png ...) against gt_dir.

    Returns scores per category found and URBAN_ROAD (the three road categories pooled). space="bev" first
    transforms ground truth and map with each image's calib (calib_dir/um_000000.txt). `names` limits the
    scoring to those ground-truth files (a validation split).
    """
    if space not in ("perspective", "bev"):
        raise ValueError(f"space must be 'perspective' or 'bev', not {space!r}")
    if space == "bev" and calib_dir is None:
        raise ValueError("space='bev' needs calib_dir")
    prob_dir, gt_dir = Path(prob_dir), Path(gt_dir)
    gt_files = sorted(gt_dir.glob("*.png")) if names is None else [gt_dir / n for n in sorted(names)]
    if not gt_files:
        raise DatasetError(f"no ground-truth PNGs in {gt_dir}")
    counts: dict[str, Counts] = {}
    lookups = {}
    for gt_path in gt_files:
        cat = category_of(gt_path.name)
        prob_path = prob_dir / gt_path.name
        if not prob_path.is_file():
            raise DatasetError(f"missing probability map {prob_path} for ground truth {gt_path.name}")
        gt, prob = _read_gt(gt_path), _read_prob(prob_path)
        if prob.shape != gt.shape[:2]:
            raise DatasetError(f"{prob_path.name}: map is {prob.shape}, ground truth is {gt.shape[:2]}")
        if space == "bev":
            parts = gt_path.stem.split("_")
            calib_path = Path(calib_dir) / f"{parts[0]}_{parts[-1]}.txt"
            if not calib_path.is_file():
                raise DatasetError(f"missing calib file {calib_path} for ground truth {gt_path.name}")
            H = bev_homography(read_calib(calib_path))
            key = (H.tobytes(), prob.shape)  # one drive shares one calib: project its grid once
            if key not in lookups:
                lookups[key] = bev_lookup(H, *prob.shape)
            gt, prob = to_bev(gt, H, lookups[key]), to_bev(prob, H, lookups[key])
        counts[cat] = counts.get(cat, Counts()) + image_counts(prob, *gt_masks(gt))
    results = {cat: scores(counts[cat]) for cat in CATEGORIES if cat in counts}
    if any(cat in counts for cat in ROAD_CATEGORIES):
        results["URBAN_ROAD"] = scores(sum(counts[c] for c in ROAD_CATEGORIES if c in counts))
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One aligned text table: a row per category, the measures as columns."""
    cols = ("MaxF", "AP", "PRE", "REC", "FPR", "FNR", "IoU", "BestThresh")
    width = max([len("category"), *map(len, results)])
    lines = [f"{'category':<{width}}" + "".join(f"{c:>11}" for c in cols)]
    for cat, s in results.items():
        cells = [f"{s[c]:>11.2f}" for c in cols[:-1]] + [f"{s['BestThresh']:>11.4f}"]
        lines.append(f"{cat:<{width}}" + "".join(cells))
    return "\n".join(lines)
