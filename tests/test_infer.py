"""infer.py: masks, overlays, BEV and benchmark maps from a trained run; bad inputs are one clear error."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT
from PIL import Image


def infer(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_infer_refuses_bad_inputs_and_never_overwrites(run, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / "a.png")
    (frames / "b.png").write_bytes(b"GIF89a not really")
    cases = [
        ((tmp_path / "missing.png",), "missing.png: no such file"),
        ((frames / "b.png", "--out", tmp_path / "out"), "b.png: not a readable image"),
        ((frames / "a.png", "--out", frames), "the output folder is the input folder"),
    ]
    for args, message in cases:
        out = infer(*args, "--model", run[1], cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "a_mask.png").write_bytes(b"an earlier result")
    out = infer(frames / "a.png", "--out", tmp_path / "out", "--model", run[1], cwd=tmp_path)
    assert out.returncode == 2 and "--overwrite" in out.stderr
    assert (tmp_path / "out" / "a_mask.png").read_bytes() == b"an earlier result"
    assert "Traceback" in infer(tmp_path / "missing.png", "--debug", cwd=tmp_path).stderr


def test_infer_writes_mask_and_overlay(run, tmp_path):
    cfg, run_dir, _ = run
    image = sorted((Path(cfg.dataset.root) / "testing" / "image_2").glob("*.png"))[0]
    out = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), str(image), "--model", str(run_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    mask = np.asarray(Image.open(tmp_path / f"{image.stem}_mask.png"))
    overlay = np.asarray(Image.open(tmp_path / f"{image.stem}_overlay.png"))
    assert mask.shape == (64, 96) and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == (64, 96, 3)
    assert str(tmp_path / f"{image.stem}_mask.png") in out.stdout

    bev = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), str(image), "--model", str(run_dir), "--bev",
         "--out", str(tmp_path / "bev"), "--kitti-submission", str(tmp_path / "submit")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bev.returncode == 0, bev.stderr
    cat, _, idx = image.stem.rpartition("_")
    assert np.asarray(Image.open(tmp_path / "submit" / f"{cat}_road_{idx}.png")).shape == (800, 400)
    assert np.asarray(Image.open(tmp_path / "bev" / f"{image.stem}_overlay.png")).shape == (800, 400, 3)


def test_infer_without_a_run_says_how_to_get_one(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    out = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), str(image)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 2
    assert "python train.py" in out.stderr and "Traceback" not in out.stderr
