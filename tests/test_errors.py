"""One way to fail clearly, and a quiet start."""

import subprocess
import sys
from pathlib import Path

import pytest

from segnet import errors


def test_a_user_error_is_one_line_and_its_exit_code(capsys):
    for error, code in [(errors.DatasetError("a.png: broken; replace it"), 2), (errors.NonFiniteLoss("nan"), 3),
                        (errors.LostWorker("gone"), 4), (FileNotFoundError("x.png: no such file"), 2)]:  # fmt: skip
        with pytest.raises(SystemExit) as exit, errors.reported():
            raise error
        assert exit.value.code == code
        assert capsys.readouterr().err == f"error: {error}\n"
    with pytest.raises(errors.DatasetError), errors.reported(debug=True):  # --debug: the traceback
        raise errors.DatasetError("a.png")
    with pytest.raises(KeyError), errors.reported():  # our bugs are not dressed up as user errors
        raise KeyError("bug")


def test_a_missing_optional_package_names_its_extra():
    e = errors.MissingExtra("videos", "video")
    assert isinstance(e, ImportError) and not isinstance(e, FileNotFoundError)
    assert "pip install -e '.[video]'" in str(e) and e.extra == "video"


def test_importing_segnet_prints_no_tensorflow_banner_unless_asked():
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("a machine with an NVIDIA driver shows the CUDA lines on purpose")
    code = "import segnet, tensorflow as tf; print(float(tf.reduce_sum(tf.ones(3))))"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})
    assert quiet.returncode == 0 and quiet.stdout == "3.0\n" and quiet.stderr == ""
    loud = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "", "TF_CPP_MIN_LOG_LEVEL": "0"}
    )
    assert loud.returncode == 0 and "cuInit" in loud.stderr
