"""segnet: FCN-8s/16s/32s road segmentation on KITTI, in TensorFlow/Keras 3.

Importing segnet imports TensorFlow without its start-up banner. On a machine without a GPU, TensorFlow 2.21
prints six to ten lines while it loads (absl's "All log messages before absl::InitializeLog()", "oneDNN
custom operations are on", "Could not find cuda drivers", "failed call to cuInit: ... CUDA error"), most of
them before it reads TF_CPP_MIN_LOG_LEVEL, so no variable silences them; the cuInit line reads like a failure
and is not one. So the import runs with stderr caught, and everything else it printed is shown afterwards.
C++ warnings and errors after start-up still show (TF_CPP_MIN_LOG_LEVEL=1). Set TF_CPP_MIN_LOG_LEVEL
yourself (0 shows everything) and TensorFlow is imported untouched.
"""

import os
import re
import sys
import tempfile
from pathlib import Path

BANNER = [
    r"WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"\] oneDNN custom operations are on",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow",
]
# Only where no NVIDIA driver is installed: with one, these lines report a real problem.
NO_GPU = [r"cudart_stub\.cc:\d+\] Could not find cuda drivers", r"cuda_platform\.cc:\d+\] failed call to cuInit"]


def _quiet_import_tensorflow() -> None:
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"  # C++ INFO off, WARNING and ERROR on
    driver = Path("/proc/driver/nvidia").exists() or Path("/dev/dxg").exists()  # Linux, WSL2
    noise = re.compile("|".join(BANNER + ([] if driver else NO_GPU)))
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)  # the C++ side writes to file descriptor 2 directly
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe, inside the window
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not noise.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


_quiet_import_tensorflow()
