import json

import keras
import pytest

from segnet import bench
from segnet.model import fcn


def test_flop_count_matches_the_textbook_figure_for_fcn8():
    """About 78 GFLOP per 160x576 forward pass for the full-width FCN-8s (issue 7), by hand below."""
    flops = bench.count_flops(fcn("fcn8", width=1.0), 160, 576)
    assert flops / 1e9 == pytest.approx(78, rel=0.03)
    # One layer by hand: block1_conv1 is 160*576 pixels x 3x3x3 inputs x 64 outputs x 2.
    image = keras.Input((None, None, 3))
    tiny = keras.Model(image, keras.layers.Conv2D(64, 3, padding="same")(image))
    assert bench.count_flops(tiny, 160, 576) == 2 * 160 * 576 * 27 * 64


def test_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    overrides = ["model.width=0.0625", "dataset.train_size=[64,96]", "trainer.batch_size=2"]
    assert bench.main(["--repeats", "1", "--json", str(out), *overrides]) == 0
    result = json.loads(out.read_text())
    for key in ("pipeline_images_per_s", "train_images_per_s", "infer_ms_per_frame", "peak_rss_mib"):
        assert result[key] > 0, key
    assert set(result["peak_gflops"]) == {"matmul_float32", "matmul_bfloat16", "conv3x3_float32", "conv3x3_bfloat16"}
    assert 0 < result["gflop_forward_train_size"] <= result["gflop_infer_frame"]
    printed = capsys.readouterr().out
    assert "inference, 1242x375 frame" in printed and str(out) in printed


def test_bench_refuses_a_misspelled_override(capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["model.widht=0.5"])
    assert exit.value.code == 2
    assert "did you mean model.width" in capsys.readouterr().err


def test_bench_names_the_cpu_units_and_the_kernels_a_training_step_runs():
    assert set(bench.cpu_units()) <= set(bench.UNITS)
    rows = bench.kernels(["model.width=0.0625", "dataset.train_size=[64,96]", "trainer.batch_size=2"], steps=1)
    kinds = {(r["kind"], r["propagation"]) for r in rows}
    assert {("convolution", "forward_training"), ("convolution", "backward_weights")} <= kinds
    assert sum(r["share"] for r in rows) == pytest.approx(1.0) and all(r["kernel"] for r in rows)
    assert "convolution forward_training" in bench.kernel_table(rows)
