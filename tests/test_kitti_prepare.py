import zipfile

import numpy as np
import pytest
from PIL import Image

from segnet.data import __main__ as data_cli
from segnet.data import check, kitti


def fake_data_road(root, n=2):
    for split in ("training", "testing"):
        for cat in ("um", "umm", "uu"):
            for i in range(n):
                d = root / split / "image_2"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(d / f"{cat}_{i:06d}.png")
                if split == "training":
                    g = root / split / "gt_image_2"
                    g.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.full((6, 8, 3), (255, 0, 255), np.uint8)).save(g / f"{cat}_road_{i:06d}.png")


def zip_tree(src, zip_path):
    with zipfile.ZipFile(zip_path, "w") as z:
        for p in sorted(src.rglob("*")):
            z.write(p, p.relative_to(src.parent))


def test_prepare_unpacks_counts_and_reports_missing_categories(tmp_path, capsys):
    fake_data_road(tmp_path / "src" / "data_road")
    zip_tree(tmp_path / "src" / "data_road", tmp_path / "data_road.zip")
    code = kitti.main(["prepare", "--zip", str(tmp_path / "data_road.zip"), "--out", str(tmp_path / "kitti")])
    out = capsys.readouterr().out
    assert (tmp_path / "kitti" / "data_road" / "training" / "image_2" / "um_000001.png").is_file()
    assert code == 1  # 2 images a category, not data_road's 95/96/98: reported, not hidden
    assert "2 um images, data_road has 95" in out
    assert f"dataset.root={tmp_path / 'kitti' / 'data_road'}" in out


def test_prepare_downloads_from_a_url(tmp_path):
    fake_data_road(tmp_path / "src" / "data_road")
    zip_tree(tmp_path / "src" / "data_road", tmp_path / "data_road.zip")
    root, problems = kitti.prepare(url=(tmp_path / "data_road.zip").as_uri(), out=tmp_path / "kitti")
    assert (tmp_path / "kitti" / "data_road.zip").is_file()
    assert root == tmp_path / "kitti" / "data_road" and problems


def test_prepare_refuses_a_zip_that_is_not_data_road(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(SystemExit) as exit:
        kitti.main(["prepare", "--zip", str(tmp_path / "x.zip"), "--out", str(tmp_path / "k")])
    assert exit.value.code == 2
    assert "training/image_2" in capsys.readouterr().err
    (tmp_path / "y.zip").write_bytes(b"not a zip")
    with pytest.raises(SystemExit) as exit:
        kitti.main(["prepare", "--zip", str(tmp_path / "y.zip"), "--out", str(tmp_path / "k")])
    assert exit.value.code == 2 and "y.zip: not a zip archive" in capsys.readouterr().err


def test_check_lists_every_problem_at_once(tmp_path, capsys):
    root = tmp_path / "data_road"
    fake_data_road(root)
    (root / "training" / "gt_image_2" / "um_road_000001.png").unlink()
    (root / "training" / "gt_image_2" / "uu_road_000007.png").write_bytes(b"\x89PNG\r\n")  # truncated, orphan
    gt = root / "training" / "gt_image_2" / "umm_road_000000.png"
    smooth = np.asarray(Image.open(gt).convert("RGB")).copy()
    smooth[0, :3] = (200, 0, 120)  # what a smoothing resize leaves at a class edge
    Image.fromarray(smooth).save(gt)
    Image.fromarray(smooth[:-1]).save(root / "training" / "gt_image_2" / "umm_road_000001.png")
    counts, problems = check(root)
    assert counts["training"] == {"um": 2, "umm": 2, "uu": 2}
    text = "\n".join(problems)
    assert "um_000001.png: no ground truth um_road_000001.png" in text
    assert "uu_road_000007.png: ground truth without its image" in text
    assert "uu_road_000007.png: not a readable image" in text
    assert "umm_road_000000.png: 3 pixels of colours outside the KITTI code, e.g. [(200, 0, 120)]" in text
    assert "umm_road_000001.png: " in text and "but its image is" in text
    assert data_cli.main(["check", str(root)]) == 1
    assert "6 problem(s)" in capsys.readouterr().out
