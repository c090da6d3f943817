"""Train an FCN: `python train.py` (synthetic demo), `python train.py dataset=kitti dataset.root=...`."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from segnet import errors, runs
from segnet.config import check_overrides, register

register()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """One training run; returns its best validation MaxF, the objective of `-m hparams_search=...`."""
    from segnet.train import train

    OmegaConf.resolve(cfg)
    hydra_cfg = HydraConfig.get()
    with errors.reported(debug=hydra_cfg.verbose):  # hydra.verbose=true: the full traceback
        # In a sweep started again, a job whose config has finished already is not trained twice.
        state = train(cfg, Path(hydra_cfg.runtime.output_dir), skip_finished=hydra_cfg.mode == RunMode.MULTIRUN)
    return state.get("best", float("nan"))


if __name__ == "__main__":
    with errors.reported():  # before Hydra starts: a typo in a key, outputs that cannot be written
        if problem := check_overrides(sys.argv[1:]):
            raise errors.ConfigError(problem)
        runs.check_outputs(sys.argv[1:])
    main()
