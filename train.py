"""Train an FCN: `python train.py` (synthetic demo), `python train.py dataset=kitti dataset.root=...`."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from segnet import errors, runs
from segnet.config import check_overrides, register

register()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from segnet.train import train

    OmegaConf.resolve(cfg)
    with errors.reported(debug=HydraConfig.get().verbose):  # hydra.verbose=true: the full traceback
        train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    with errors.reported():  # before Hydra starts: a typo in a key, outputs that cannot be written
        if problem := check_overrides(sys.argv[1:]):
            raise errors.ConfigError(problem)
        runs.check_outputs(sys.argv[1:])
    main()
