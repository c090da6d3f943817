"""Synthetic road scenes, written in the KITTI data_road layout and colours so one loader reads both.

The scene model. A pinhole camera (KITTI's focal length, scaled to the image width) sits about 1.65 m
above a flat ground plane, with a small random pitch and roll. Every pixel below the horizon is ray-cast
to its point (x, z) on the plane, and the ground is described there, in metres: a road strip around a
curved centre line x(z) = a + b z + c z^2, sometimes with a fork or a side road, lane markings, curbs and
sidewalks, grass and dirt, shadow bands and dappled shade, haze with distance. The ground truth comes
from the same test on the same (x, z), so it is exact and agrees with the calibration file written beside
each image. Above the plane: a sky gradient and a far skyline of trees and buildings, then buildings,
trees and cars as 3D boxes and blobs, projected with the same camera and painted far to near. They hide
the road behind them, so a car on the road is non-road, as in KITTI. Lighting, colour cast, sensor noise
and blur go on last, so brightness alone never separates road from non-road.

Categories follow KITTI: um (two marked lanes), umm (several marked lanes), uu (unmarked, ragged edges).
About half the images have an area outside the evaluation (black in the ground truth): a band at the
top, the ego vehicle's hood at the bottom, or, as in KITTI, the other carriageway beyond a median.

The label is drawn with six classes (CLASSES). layout="kitti" writes it reduced to road / non-road, in
KITTI's colours; layout="folder" writes the same scenes as images/ and masks/ of the class codes.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segnet.data import IGNORE

CATEGORIES = ("um", "umm", "uu")
SPLITS = ("training", "testing")
VERSION = 1  # bump when the scenes change, so datasets already on disk are regenerated
KITTI_FOCAL, KITTI_WIDTH = 721.5377, 1242
CLASSES = ("background", "road", "lane_marking", "sidewalk", "car", "sky")  # the folder layout's mask codes
BACKGROUND, ROAD, LANE, SIDEWALK, CAR, SKY = range(len(CLASSES))  # and IGNORE
NONROAD = 0  # the KITTI layout's codes: NONROAD, ROAD and IGNORE, as segnet.data reads its masks back
BINARY = np.zeros(256, np.uint8)  # class code -> KITTI code; a lane marking is road to the benchmark
BINARY[[ROAD, LANE]], BINARY[IGNORE] = ROAD, IGNORE
GT_COLOURS = np.zeros((256, 3), np.uint8)  # indexed by KITTI code; IGNORE stays black
GT_COLOURS[NONROAD], GT_COLOURS[ROAD] = (255, 0, 0), (255, 0, 255)
LAYOUTS = {"kitti": SPLITS, "folder": ("images", "masks", "test")}  # the folders a layout writes under root


def complete(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):  # no marker, or a torn one: ours, but incomplete
        return False


def generate(root, num_train: int, num_test: int, height: int, width: int, seed: int, layout: str = "kitti") -> Path:
    """Write the dataset under root unless a complete one with the same parameters is already there; return root.

    layout "kitti": data_road folders, road / non-road. "folder": images/ and masks/ (class codes, IGNORE
    outside the evaluation) of the training scenes and test/ of the test scenes; the same images either way.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {list(LAYOUTS)}")
    root = Path(root)
    params = dict(version=VERSION, num_train=num_train, num_test=num_test, height=height, width=width, seed=seed)
    if layout != "kitti":  # the kitti marker stays as it was, so datasets already on disk are still complete
        params["layout"] = layout
    marker = root / "synthetic.json"
    if complete(marker, params):
        return root
    if not marker.exists() and any((root / folder).exists() for folder in LAYOUTS[layout]):
        # Without our marker this may be real data: never delete what we did not write.
        raise FileExistsError(
            f"{root} holds a dataset without synthetic.json, so it was not generated here; "
            "point dataset.root at another folder or delete this one"
        )

    tmp = Path(f"{root}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kitti = ("training/image_2", "training/gt_image_2", "training/calib", "testing/image_2", "testing/calib")
    for folder in kitti if layout == "kitti" else LAYOUTS[layout]:
        (tmp / folder).mkdir(parents=True)
    for code, (split, n) in enumerate(zip(SPLITS, (num_train, num_test), strict=True)):
        for i in range(n):
            cat, idx = CATEGORIES[i % 3], f"{i // 3:06d}"
            # One generator per image, so an image does not depend on how many others are generated.
            rng = np.random.default_rng([seed, code, i])
            s = scene(rng, cat, height, width)
            image, label = render(s, rng)
            if layout == "kitti":
                Image.fromarray(image).save(tmp / split / "image_2" / f"{cat}_{idx}.png")
                if split == "training":
                    gt = GT_COLOURS[BINARY[label]]
                    Image.fromarray(gt).save(tmp / split / "gt_image_2" / f"{cat}_road_{idx}.png")
                (tmp / split / "calib" / f"{cat}_{idx}.txt").write_text(calib_text(s))
            elif split == "training":
                Image.fromarray(image).save(tmp / "images" / f"{cat}_{idx}.png")
                Image.fromarray(label).save(tmp / "masks" / f"{cat}_{idx}.png")  # mode L: the class codes
            else:
                Image.fromarray(image).save(tmp / "test" / f"{cat}_{idx}.png")
    (tmp / "synthetic.json").write_text(json.dumps(params, indent=2) + "\n")

    try:
        os.replace(tmp, root)  # atomic: the dataset appears complete or not at all; fails if root is not empty
        return root
    except OSError:
        if complete(marker, params):  # another process (a second worker) wrote the same dataset first
            shutil.rmtree(tmp)
            return root
    # root exists (perhaps with other files in it): spoil the marker first, so a crash part way through
    # the swap leaves a dataset that is regenerated next time, then move the marker in last.
    marker.write_text('{"incomplete": true}\n')
    for folder in LAYOUTS[layout]:
        shutil.rmtree(root / folder, ignore_errors=True)
        os.replace(tmp / folder, root / folder)
    os.replace(tmp / "synthetic.json", marker)
    tmp.rmdir()
    return root


# -----------------------------------------------------------------------------
# camera: road coordinates are x right, y down, z ahead, the road plane is y = 0 (KITTI's Tr_cam_to_road)


def rotation(pitch, roll):
    cp, sp, cr, sr = np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx


def rays(s):
    """Direction of every pixel's ray in road coordinates, three (H, W) arrays; pixel centres at integers."""
    a = (np.arange(s["width"]) - s["cx"]) / s["f"]
    b = (np.arange(s["height"])[:, None] - s["cy"]) / s["f"]
    R = s["R"]
    return [R[k, 0] * a + R[k, 1] * b + R[k, 2] for k in range(3)]


def project(s, p):
    """Road-coordinate points (N, 3) -> pixel coordinates (N, 2) and depth along the optical axis (N,)."""
    cam = (np.asarray(p, np.float64) - [0.0, -s["cam_height"], 0.0]) @ s["R"]  # R^T (p - t), row-wise
    z = cam[:, 2]
    return np.stack([s["cx"] + s["f"] * cam[:, 0] / z, s["cy"] + s["f"] * cam[:, 1] / z], 1), z


def calib_text(s) -> str:
    """A KITTI data_road calib file for the camera s: P2 = K [I | 0], R0_rect = I, Tr_cam_to_road = [R | t]."""
    # The devkit reads projected coordinates as 1-based pixels (MATLAB heritage); our pixel centres are 0-based.
    f, cx, cy = s["f"], s["cx"] + 1, s["cy"] + 1
    K = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]])
    P2 = np.hstack([K, np.zeros((3, 1))])
    P3 = np.hstack([K, [[-0.54 * f], [0], [0]]])  # a right camera 0.54 m away, KITTI's stereo baseline
    cam_to_road = np.hstack([s["R"], [[0], [-s["cam_height"]], [0]]])
    velo_to_cam = [[0, -1, 0, -0.004], [0, 0, -1, -0.076], [1, 0, 0, -0.272]]  # KITTI's, rounded
    imu_to_velo = [[1, 0, 0, -0.809], [0, 1, 0, 0.320], [0, 0, 1, -0.800]]
    rows = [("P0", P2), ("P1", P3), ("P2", P2), ("P3", P3), ("R0_rect", np.eye(3))]
    rows += [("Tr_velo_to_cam", velo_to_cam), ("Tr_imu_to_velo", imu_to_velo), ("Tr_cam_to_road", cam_to_road)]
    return "".join(f"{k}: " + " ".join(f"{x:.12e}" for x in np.ravel(m)) + "\n" for k, m in rows)


# -----------------------------------------------------------------------------
# the ground plane, in metres


def centre(s, z):
    return s["a"] + s["b"] * z + s["c"] * z * z


def lateral(s, x, z):
    """Signed distance across the road from its centre line (+ right): x offset times the cosine of the heading."""
    slope = s["b"] + 2 * s["c"] * z
    return (x - centre(s, z)) / np.sqrt(1 + slope * slope)


def road_edges(s, z):
    """Lateral offsets of the left and right road edge at depth z; unmarked roads have ragged edges."""
    amp, freq, phase = s["ragged"]  # each (2, 3): left and right edge, three sinusoids
    wobble = (amp[:, :, None] * np.sin(freq[:, :, None] * np.ravel(z) + phase[:, :, None])).sum(1)
    hw = s["road_width"] / 2
    return -hw + wobble[0].reshape(np.shape(z)), hw + wobble[1].reshape(np.shape(z))


def road_region(s, x, z):
    """Which ground points (x, z) are road: the main strip and any fork or side road."""
    lat = lateral(s, x, z)
    left, right = road_edges(s, z)
    road = (lat > left) & (lat < right)
    br = s["branch"]
    if br is not None and br["kind"] == "fork":
        # The branch leaves from one edge and diverges at a constant angle, keeping its own width.
        side, hw = br["side"], br["width"] / 2
        x2 = centre(s, z) + side * (s["road_width"] / 2 - hw) + side * br["slope"] * (z - br["z0"])
        slope = s["b"] + 2 * s["c"] * z + side * br["slope"]
        road |= (np.abs(x - x2) < hw * np.sqrt(1 + slope * slope)) & (z > br["z0"])
    elif br is not None:
        # A side road crossing at depth z0, leaving to one side (side = +-1) or both (side = 0).
        d = z - br["z0"] - br["slope"] * (x - centre(s, br["z0"]))
        across = np.abs(d) < br["width"] / 2 * np.sqrt(1 + br["slope"] ** 2)
        road |= across & ((br["side"] == 0) | (br["side"] * (x - centre(s, z)) > 0))
    return road


def carriageway(s, lat, left):
    """The other carriageway beyond a median on the left: drawn as road, outside the evaluation (as in KITTI)."""
    if s["carriageway"] is None:
        return np.zeros(np.shape(lat), bool)
    median, width = s["carriageway"]
    return (lat < left - median) & (lat > left - median - width)


def occupied(s, x, z):
    """Ground where no tree or building may stand: roads, sidewalks and a margin."""
    lat = lateral(s, x, z)
    left, right = road_edges(s, z)
    keep_clear = (lat > left - s["sidewalk"][0] - 0.8) & (lat < right + s["sidewalk"][1] + 0.8)
    if s["carriageway"] is not None:
        keep_clear |= lat > left - sum(s["carriageway"]) - 0.8
    return keep_clear | road_region(s, x, z)


def noise(rng, x, y, scale):
    """Smooth random field in [0, 1] at points (x, y), with features about `scale` apart (value noise)."""
    n = 64
    grid = rng.random((n, n + 1)).astype(np.float32)
    grid[:, n] = grid[:, 0]
    x, y = x / scale, y / scale
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep hides the grid
    i, j = x0.astype(np.int64) % n, y0.astype(np.int64) % n
    j1 = (j + 1) % n
    top = grid[j, i] * (1 - fx) + grid[j, i + 1] * fx
    bottom = grid[j1, i] * (1 - fx) + grid[j1, i + 1] * fx
    return top * (1 - fy) + bottom * fy


# -----------------------------------------------------------------------------
# one scene: every random choice except textures and noise


def grey(rng, lo, hi, tint=0.03):
    return np.clip(rng.uniform(lo, hi) * (1 + rng.uniform(-tint, tint, 3)), 0, 1)


def scene(rng, category: str, height: int, width: int) -> dict:
    s = dict(category=category, height=height, width=width)
    f = KITTI_FOCAL * width / KITTI_WIDTH
    s.update(f=f, cx=(width - 1) / 2 + rng.uniform(-0.01, 0.01) * width, cy=rng.uniform(0.40, 0.50) * height)
    s.update(cam_height=rng.uniform(1.55, 1.75), R=rotation(rng.normal(0, 0.005), rng.normal(0, 0.01)))

    # Road geometry. The car drives on the right, so the centre line is mostly to its left.
    w = rng.uniform(*{"um": (6, 9), "umm": (9, 12), "uu": (4.5, 7)}[category])
    s.update(road_width=w, a=-rng.uniform(-0.1, 0.3) * w, b=rng.normal(0, 0.04), c=rng.uniform(-0.004, 0.004))
    amp = rng.uniform(0.05, 0.25, (2, 3)) if category == "uu" else np.zeros((2, 3))
    s["ragged"] = (amp, rng.uniform(0.05, 0.6, (2, 3)), rng.uniform(0, 2 * np.pi, (2, 3)))
    s["branch"] = None
    if rng.random() < 0.25:
        side = rng.choice([-1, 1])
        if rng.random() < 0.5:
            bw = min(rng.uniform(4, 8), w)
            s["branch"] = dict(
                kind="fork", side=side, width=bw, z0=rng.uniform(8, 30), slope=np.tan(rng.uniform(0.25, 0.7))
            )
        else:
            side = rng.choice([-1, 0, 1])
            s["branch"] = dict(
                kind="side", side=side, width=rng.uniform(4, 8), z0=rng.uniform(10, 35), slope=rng.uniform(-0.3, 0.3)
            )

    # Outside the evaluation area in about half the images.
    kinds = ["top", "hood"] + (["carriageway"] if category != "uu" else [])
    s["ignore"] = rng.choice(kinds) if rng.random() < 0.5 else None
    s["carriageway"] = (rng.uniform(1, 4), rng.uniform(6, 9)) if s["ignore"] == "carriageway" else None
    s["top_band"] = rng.uniform(0.4, 1.0) * s["cy"]
    s["hood"] = (rng.uniform(0.05, 0.12) * height, grey(rng, 0.05, 0.5, 0.3), rng.uniform(0.8, 1.2))

    # Sidewalks (left, right width; 0 is none): common in town, rare on unmarked roads.
    p = 0.25 if category == "uu" else 0.7
    s["sidewalk"] = [rng.uniform(1.2, 3.5) * (rng.random() < p) for _ in range(2)]
    if s["carriageway"] is not None:
        s["sidewalk"][0] = 0.0

    # Lane markings: (lateral offset, line width, dashed, colour). Dashes are 3 m in a 9 m period.
    white, yellow = np.array([0.92, 0.92, 0.9]), np.array([0.9, 0.75, 0.2])
    hw, lw = w / 2, rng.uniform(0.1, 0.2)
    lines = []
    if category == "um":
        lines.append((0.0, lw, rng.random() < 0.7, yellow if rng.random() < 0.15 else white))
    elif category == "umm":
        n = max(2, round(w / 3.2))
        lines += [(-hw + k * w / n, lw, True, white) for k in range(1, n)]
    if category != "uu" and rng.random() < 0.6:
        lines += [(-hw + 0.3, lw, False, white), (hw - 0.3, lw, False, white)]
    s["lines"], s["dash_phase"], s["paint_wear"] = lines, rng.uniform(0, 9), rng.uniform(0.6, 1.0)
    s["zebra"] = rng.uniform(10, 30) if category != "uu" and rng.random() < 0.15 else None

    # Materials.
    asphalt = grey(rng, 0.22, 0.5)
    s["asphalt"] = asphalt * [1.12, 1.0, 0.82] if rng.random() < 0.2 else asphalt  # sometimes brownish
    s["sidewalk_colour"] = grey(rng, 0.45, 0.72) * ([1.12, 0.92, 0.82] if rng.random() < 0.25 else 1)
    s["grass"] = np.array([rng.uniform(0.18, 0.35), rng.uniform(0.33, 0.5), rng.uniform(0.08, 0.2)])
    dirt = np.array([0.48, 0.4, 0.3]) * rng.uniform(0.7, 1.2)
    s["dirt"] = grey(rng, 0.35, 0.55) if rng.random() < 0.2 else dirt  # gravel can look like asphalt
    s["dirt_level"] = rng.uniform(0.3, 1.0)  # how much of the terrain is grass
    s["sky"] = (
        grey(rng, 0.75, 0.95),
        np.array([0.35, 0.55, 0.85]) * rng.uniform(0.8, 1.1) if rng.random() < 0.7 else grey(rng, 0.6, 0.8),
    )
    s["haze"] = rng.uniform(150, 600)
    s["shadows"] = [(rng.uniform(-1, 1), rng.uniform(5, 50), rng.uniform(1, 6)) for _ in range(rng.integers(0, 4))]
    s["dapple"] = rng.random() < 0.4
    s["shade"] = rng.uniform(0.4, 0.7)
    s["skyline"] = (rng.uniform(120, 250), rng.uniform(3, 20, 60), rng.uniform(0, 30, 12), grey(rng, 0.3, 0.7, 0.1))
    s["light"] = (rng.uniform(0.75, 1.25), rng.uniform(0.8, 1.2), rng.uniform(0.92, 1.08, 3))
    s["sensor"] = (rng.uniform(0.005, 0.03), rng.uniform(0, 0.7) if rng.random() < 0.5 else 0)
    s["objects"] = place_objects(s, rng)
    return s


def place_objects(s, rng):
    """Buildings and trees beside the road, cars on and beside it: (depth, kind, params), far ones first."""
    urban = s["category"] != "uu"
    objects = []

    def clear(x, z, half_x, half_z):
        xs, zs = np.meshgrid(x + np.linspace(-half_x, half_x, 4), z + np.linspace(-half_z, half_z, 4))
        return not occupied(s, xs, zs).any()

    for _ in range(rng.integers(0, 7) if urban else rng.integers(0, 3)):
        side, z = rng.choice([-1, 1]), rng.uniform(15, 90)
        half_x, half_z, h = rng.uniform(3, 8), rng.uniform(4, 12), rng.uniform(4, 16)
        x = centre(s, z) + side * (s["road_width"] / 2 + s["sidewalk"][int(side > 0)] + rng.uniform(2, 12) + half_x)
        if clear(x, z, half_x, half_z):
            colours = grey(rng, 0.35, 0.85, 0.15) * np.array([[1.0], [0.75], [0.9]])  # front, side, roof
            objects.append((z - half_z, "box", (x, z, 2 * half_x, 2 * half_z, h, 0.0, colours, True)))
    for _ in range(rng.integers(2, 12)):
        side, z, r = rng.choice([-1, 1]), rng.uniform(5, 80), rng.uniform(1.2, 3.5)
        x = centre(s, z) + side * (s["road_width"] / 2 + s["sidewalk"][int(side > 0)] + rng.uniform(0.8, 10) + r)
        if clear(x, z, r / 2, r / 2):
            green = np.array([rng.uniform(0.1, 0.3), rng.uniform(0.22, 0.45), rng.uniform(0.05, 0.18)])
            objects.append((z - r, "tree", (x, z, r, rng.uniform(1, 3), green, rng.integers(0, 1 << 30))))
    cars = []
    hw = s["road_width"] / 2
    lanes = [-hw / 2, hw / 2] if s["category"] != "umm" else list(np.arange(-hw + 1.6, hw - 1.5, 3.2))
    for k in range(rng.integers(0, 4) + rng.integers(0, 2)):
        parked = k % 2 == 1
        lat = rng.choice([-1, 1]) * (hw - 1.1) if parked else rng.choice(lanes) + rng.normal(0, 0.2)
        z = rng.uniform(7 if parked else 9, 60)
        if all(abs(z - z2) > 7 or abs(lat - l2) > 2.2 for z2, l2 in cars):
            cars.append((z, lat))
            slope = s["b"] + 2 * s["c"] * z
            x = centre(s, z) + lat * np.sqrt(1 + slope * slope)
            size = (rng.uniform(1.65, 1.9), rng.uniform(3.8, 4.8), rng.uniform(1.35, 1.6))
            paint = [0.9, 0.9, 0.9] if rng.random() < 0.25 else grey(rng, 0.05, 0.7, 0.6)
            objects.append((z - size[1] / 2, "car", (x, z, size, np.arctan(slope), np.clip(paint, 0, 1))))
    return sorted(objects, key=lambda o: -o[0])


# -----------------------------------------------------------------------------
# drawing


def render(s, rng):
    """The scene as an (H, W, 3) uint8 image and an (H, W) label of CLASSES codes and IGNORE."""
    H, W, f = s["height"], s["width"], s["f"]
    dx, dy, dz = rays(s)
    ground = dy > 1e-6
    t = s["cam_height"] / np.maximum(dy, 1e-6)
    X, Z = t * dx, t * dz
    lat = lateral(s, X, Z)
    left, right = road_edges(s, Z)
    grain = rng.standard_normal((H, W)).astype(np.float32)  # per-pixel texture, amplitude set per surface

    # Terrain: grass mixed with dirt or gravel.
    mix = 0.7 * noise(rng, X, Z, 6.0) + 0.3 * noise(rng, X, Z, 1.5)
    wdirt = np.clip((mix - s["dirt_level"]) * 6 + 0.5, 0, 1)[..., None]
    img = s["grass"] * (1 - wdirt) + s["dirt"] * wdirt
    img = img * (0.8 + 0.4 * noise(rng, X, Z, 0.4) + 0.08 * grain)[..., None]
    label = np.full((H, W), BACKGROUND, np.uint8)

    # Sidewalks with a bright curb stone at the road edge.
    for side, width in zip((-1, 1), s["sidewalk"], strict=True):
        edge = left if side < 0 else right
        off = side * (lat - edge)
        walk = (off >= 0) & (off < width)
        label[ground & walk] = SIDEWALK  # the curb too
        tone = s["sidewalk_colour"] * (0.93 + 0.14 * noise(rng, X, Z, 0.7) + 0.04 * grain)[..., None]
        img = np.where(walk[..., None], tone, img)
        img = np.where((walk & (off < 0.2))[..., None], np.float32(0.78), img)

    # Asphalt, with large-scale wear, fine grain and the odd darker patch.
    tone = 0.9 + 0.2 * noise(rng, X, Z, 5.0) + 0.08 * noise(rng, X, Z, 0.3) + 0.035 * grain
    tone = tone - 0.12 * (noise(rng, X, Z, 2.0) > 0.8)
    asphalt = s["asphalt"] * tone[..., None]
    other = ground & carriageway(s, lat, left)
    road = ground & road_region(s, X, Z)
    img = np.where((road | other)[..., None], asphalt, img)
    label[other], label[road] = IGNORE, ROAD

    # Lane markings, soft-edged: their width in pixels falls below one with distance.
    px_per_m = f / np.maximum(Z, 0.1)
    on_main = ground & (lat > left) & (lat < right)
    paint = np.zeros((H, W), np.float32)
    colour = np.zeros((H, W, 3), np.float32)
    for off, lw, dashed, c in s["lines"]:
        a = np.clip((lw / 2 - np.abs(lat - off)) * px_per_m + 0.5, 0, 1)
        if dashed:
            a = a * (((Z + s["dash_phase"]) % 9.0) < 3.0)
        paint, colour = np.maximum(paint, a), np.where((a > 0)[..., None], c, colour)
    if s["zebra"] is not None:
        a = (np.abs(Z - s["zebra"]) < 1.5) & ((lat % 1.0) < 0.5)
        paint, colour = np.maximum(paint, a), np.where(a[..., None], 0.92, colour)
    paint = paint * on_main * s["paint_wear"] * (0.7 + 0.3 * noise(rng, X, Z, 0.5))
    label[paint >= 0.5] = LANE  # mostly paint, not mostly asphalt; on_main keeps it on the road
    img = img * (1 - paint[..., None]) + colour * paint[..., None]

    # Shadows over everything on the ground, so darkness alone is not a cue for road or not.
    shade = np.zeros((H, W), bool)
    for angle, z0, width in s["shadows"]:
        shade |= np.abs((Z - z0) * np.cos(angle) - X * np.sin(angle)) < width / 2
    if s["dapple"]:
        shade |= noise(rng, X, Z, 2.5) > 0.65
    img = np.where(shade[..., None], img * s["shade"] * np.array([0.92, 0.96, 1.08]), img)

    # Sky, haze towards the horizon, and a far skyline of trees and buildings.
    horizon, zenith = s["sky"]
    elev = np.arctan2(-dy, np.hypot(dx, dz))
    up = np.clip(elev / 0.35, 0, 1)[..., None] ** 0.7
    sky = horizon * (1 - up) + zenith * up
    sky = sky * (0.95 + 0.1 * noise(rng, dx * 40, dy * 120, 1.0))[..., None]  # streaky clouds
    fog = (1 - np.exp(-np.where(ground, Z, np.inf) / s["haze"]))[..., None]
    img = np.where(ground[..., None], img * (1 - fog) + horizon * fog, sky)
    dist, trees, blocks, stone = s["skyline"]
    az = np.arctan2(dx, dz)
    tree_h = np.interp(az, np.linspace(-1.3, 1.3, len(trees)), trees)
    block_h = blocks[np.clip(((az + 1.3) / 2.6 * len(blocks)).astype(int), 0, len(blocks) - 1)]
    behind = ~ground | (dist < Z)
    in_trees = behind & (elev < np.arctan(tree_h / dist))
    in_blocks = behind & (elev < np.arctan(block_h / dist)) & ~in_trees
    leaves = np.array([0.16, 0.24, 0.12]) * (0.7 + 0.6 * noise(rng, az * 300, elev * 300, 1.0))[..., None]
    img = np.where(in_trees[..., None], leaves, img)
    img = np.where(in_blocks[..., None], stone * (0.9 + 0.1 * np.sign(np.sin(az * 40)))[..., None], img)
    label[~ground] = SKY
    label[in_trees | in_blocks] = BACKGROUND

    # Solid things, far to near, drawn with PIL on the image and the label alike (no antialiasing).
    im = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    lab = Image.fromarray(label)
    draw, draw_label = ImageDraw.Draw(im), LabelPen(lab)
    for _, kind, p in s["objects"]:
        draw_label.code = CAR if kind == "car" else BACKGROUND
        {"box": draw_box, "tree": draw_tree, "car": draw_car}[kind](s, draw, draw_label, *p)
    if s["ignore"] == "hood":
        hood_h, colour, spread = s["hood"]
        box = [s["cx"] - spread * W, H - hood_h, s["cx"] + spread * W, H - hood_h + 6 * hood_h]
        draw.ellipse(box, fill=rgb(colour))
        draw.ellipse([box[0] + 0.3 * W, box[1] + 0.3 * hood_h, box[2] - 0.3 * W, box[3]], fill=rgb(colour * 1.3 + 0.05))
        draw_label.code = IGNORE
        draw_label.ellipse(box)
    img = np.asarray(im).astype(np.float32) / 255
    label = np.array(lab)
    if s["ignore"] == "top":
        label[: int(s["top_band"])] = IGNORE

    # The camera: exposure, contrast, white balance, sensor noise, a little blur.
    brightness, contrast, cast = s["light"]
    img = (img - img.mean()) * contrast + img.mean()
    img = img * brightness * cast
    sigma, blur = s["sensor"]
    img = img + sigma * rng.standard_normal(img.shape).astype(np.float32)
    im = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(im), label


class LabelPen:
    """Draws on the label image in the class of the object being drawn, so the shapes need not know it."""

    def __init__(self, image):
        self.draw, self.code = ImageDraw.Draw(image), BACKGROUND

    def polygon(self, xy):
        self.draw.polygon(xy, fill=self.code)

    def ellipse(self, box):
        self.draw.ellipse(box, fill=self.code)


def rgb(c):
    return tuple(int(v) for v in np.clip(np.asarray(c) * 255, 0, 255))


def polygon(s, draw, draw_label, points, colour):
    """Project road-coordinate points and fill their polygon on the image and the label."""
    uv, depth = project(s, points)
    if (depth < 0.5).any():
        return
    xy = [tuple(p) for p in uv]
    draw.polygon(xy, fill=rgb(colour))
    draw_label.polygon(xy)


def box_corners(x, z, width, length, height, yaw):
    """The 8 corners of a box standing on the road, rotated by yaw about the vertical."""
    cx, cz = np.array([-1, 1, 1, -1]) * width / 2, np.array([-1, -1, 1, 1]) * length / 2
    c, s_ = np.cos(yaw), np.sin(yaw)
    bx, bz = x + c * cx + s_ * cz, z - s_ * cx + c * cz
    bottom = np.stack([bx, np.zeros(4), bz], 1)
    return bottom, bottom - [0, height, 0]


def draw_box(s, draw, draw_label, x, z, width, length, height, yaw, colours, windows=False):
    """A box: only the faces turned towards the camera, so no painting order is needed between them."""
    bottom, top = box_corners(x, z, width, length, height, yaw)
    cam = np.array([0, -s["cam_height"], 0])
    faces = [(top, colours[2], [0, -1, 0])]
    for k in range(4):
        quad = np.stack([bottom[k], bottom[(k + 1) % 4], top[(k + 1) % 4], top[k]])
        mid = quad.mean(0)
        normal = np.cross(quad[1] - quad[0], [0, -1, 0])
        normal *= np.sign(np.dot(normal, mid - [x, mid[1], z]))
        faces.append((quad, colours[k % 2], normal))
    for quad, colour, normal in faces:
        if np.dot(cam - quad.mean(0), normal) > 0:
            polygon(s, draw, draw_label, quad, colour)
            if windows and quad is not top:
                draw_windows(s, draw, quad, colour)


def draw_windows(s, draw, quad, colour):
    """Rows of dark windows on a wall, when the wall is big enough on screen for them to show."""
    uv, depth = project(s, quad)
    if (depth < 0.5).any() or np.ptp(uv[:, 1]) < 12:
        return
    along, up = quad[1] - quad[0], quad[3] - quad[0]
    n_col, n_row = int(np.linalg.norm(along) / 3), int(np.linalg.norm(up) / 3)
    glass = rgb(colour * 0.35 + 0.05)
    for i in range(n_col):
        for j in range(n_row):
            u0, v0 = (i + 0.3) / n_col, (j + 0.35) / n_row
            u1, v1 = u0 + 0.4 / n_col, v0 + 0.4 / n_row
            pts = quad[0] + np.outer([u0, u1, u1, u0], along) + np.outer([v0, v0, v1, v1], up)
            draw.polygon([tuple(p) for p in project(s, pts)[0]], fill=glass)


def draw_tree(s, draw, draw_label, x, z, r, trunk, green, seed):
    """A trunk and a round crown of overlapping leaf clumps."""
    draw_box(s, draw, draw_label, x, z, 0.35, 0.35, trunk + r * 0.5, 0.0, np.array([[0.3, 0.22, 0.15]] * 3))
    uv, depth = project(s, [[x, -trunk - r, z]])
    if depth[0] < 0.5:
        return
    (u, v), rp = uv[0], s["f"] * r / depth[0]
    draw.ellipse([u - rp, v - rp, u + rp, v + rp], fill=rgb(green))
    draw_label.ellipse([u - rp, v - rp, u + rp, v + rp])
    rng = np.random.default_rng(seed)
    for _ in range(6):
        du, dv, rr = rng.uniform(-0.45, 0.45) * rp, rng.uniform(-0.45, 0.45) * rp, rng.uniform(0.3, 0.5) * rp
        draw.ellipse([u + du - rr, v + dv - rr, u + du + rr, v + dv + rr], fill=rgb(green * rng.uniform(0.7, 1.4)))


def draw_car(s, draw, draw_label, x, z, size, yaw, paint):
    """A car: a shadow on the road, a body, a narrower cabin with dark glass, wheels and lights."""
    width, length, height = size
    shadow_bottom, _ = box_corners(x, z, width + 0.3, length + 0.3, 0, yaw)
    uv, depth = project(s, shadow_bottom)
    if (depth > 0.5).all():
        draw.polygon([tuple(p) for p in uv], fill=(20, 20, 22))  # the road stays road in the label
    body = paint * np.array([[1.0], [0.8], [1.1]])
    draw_box(s, draw, draw_label, x, z, width, length, height * 0.6, yaw, body)
    _, body_top = box_corners(x, z, width, length, height * 0.6, yaw)
    wheel = np.array([[0.05, 0.05, 0.05]] * 3)
    for k in (0, 1, 2, 3):  # wheels poke out below the body at the corners
        wx, wz = body_top[k, 0] * 0.9 + x * 0.1, body_top[k, 2] * 0.8 + z * 0.2
        draw_box(s, draw, draw_label, wx, wz, 0.25, 0.6, 0.35, yaw, wheel)
    glass = np.clip(paint * 0.2 + 0.08, 0, 1) * np.array([[1.0], [1.0], [1.0]])
    cabin = box_corners(x, z, width * 0.85, length * 0.5, height, yaw)[1]
    low = box_corners(x, z, width * 0.85, length * 0.5, height * 0.6, yaw)[1]
    cam = np.array([0, -s["cam_height"], 0])
    for k in range(4):
        quad = np.stack([low[k], low[(k + 1) % 4], cabin[(k + 1) % 4], cabin[k]])
        outward = quad.mean(0) - [x, quad.mean(0)[1], z]
        if np.dot(cam - quad.mean(0), outward) > 0:
            polygon(s, draw, draw_label, quad, glass[0])
    polygon(s, draw, draw_label, cabin, paint * 1.1)
