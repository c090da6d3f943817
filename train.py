"""Train an FCN: `python train.py` (synthetic demo), `python train.py dataset=kitti dataset.root=...`."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from segnet.config import check_overrides, register  # noqa: E402

register()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from segnet.data import DatasetError
    from segnet.train import train

    OmegaConf.resolve(cfg)
    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (DatasetError, FileNotFoundError) as e:
        # The user's data or paths, not our code: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if problem := check_overrides(sys.argv[1:]):
        sys.exit(f"error: {problem}")
    main()
