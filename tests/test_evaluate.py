"""evaluate.py: a run scored the way the KITTI devkit scores it, in perspective and bird's-eye view."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY
from PIL import Image


def evaluate(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_evaluate_reproduces_the_validation_maxf_of_training(run, tmp_path):
    cfg, run_dir, _ = run
    out = evaluate(*TINY, f"dataset.root={cfg.dataset.root}", f"outputs={tmp_path}", f"eval.run={run_dir}")
    assert out.returncode == 0, out.stderr
    (scores,) = tmp_path.glob("eval/*/*/scores.json")
    results = json.loads(scores.read_text())
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert results["URBAN_ROAD"]["MaxF"] == pytest.approx(100 * best["maxf"], abs=0.05)
    assert {"um_road", "umm_road", "uu_road"} <= set(results)
    assert "URBAN_ROAD" in out.stdout and "BestThresh" in out.stdout
    maps = sorted(p.name for p in (scores.parent / "maps").iterdir())
    assert len(maps) == 6 and maps[0] == "um_road_000004.png"  # the last 2 of each category, benchmark names

    bev = evaluate(*TINY, f"dataset.root={cfg.dataset.root}", f"outputs={tmp_path}", f"eval.run={run_dir}",
                   "eval.space=bev", "eval.flip=true")  # fmt: skip
    assert bev.returncode == 0, bev.stderr
    assert "bev" in bev.stdout and "URBAN_ROAD" in bev.stdout and "mirror-averaged" in bev.stdout


def test_evaluate_scores_any_folder_of_maps_without_a_model(kitti_sample, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    for gt in (kitti_sample / "training" / "gt_image_2").glob("*_road_*.png"):
        road = np.asarray(Image.open(gt))[..., 2] > 0
        Image.fromarray((road * 255).astype(np.uint8)).save(maps / gt.name)
    out = evaluate("dataset=kitti", f"dataset.root={kitti_sample}", f"eval.pred_dir={maps}", f"outputs={tmp_path}")
    assert out.returncode == 0, out.stderr
    (scores,) = tmp_path.glob("eval/*/*/scores.json")
    assert json.loads(scores.read_text())["URBAN_ROAD"]["MaxF"] == pytest.approx(100)
    missing = evaluate("dataset=kitti", f"dataset.root={kitti_sample}", f"eval.pred_dir={tmp_path / 'none'}",
                       f"outputs={tmp_path}")  # fmt: skip
    assert missing.returncode == 2 and "none" in missing.stderr and "Traceback" not in missing.stderr
