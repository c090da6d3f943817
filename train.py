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

    import tensorflow as tf

    from segnet.data import DatasetError
    from segnet.train import NonFiniteLoss, train

    OmegaConf.resolve(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train(cfg, run_dir)
    except (DatasetError, FileNotFoundError) as e:
        # The user's data or paths, not our code: one clear line, no traceback.
        if HydraConfig.get().verbose:  # hydra.verbose=true: the full traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except tf.errors.UnavailableError as e:
        # Another worker of a multi-worker job died (killed, preempted, its machine lost): tf.distribute
        # aborts the collectives here too, so the whole job stops and can be started again.
        lines = e.message.strip().splitlines()
        reason = next((line for line in lines if "aborted by" in line), lines[0])
        print(
            f"error: lost contact with another worker ({reason}); finished epochs are saved by the chief; "
            "start every worker again with the same command to continue",
            file=sys.stderr,
        )
        sys.exit(4)
    except KeyboardInterrupt:
        # Every finished epoch is already on disk (written atomically); only the current one is lost.
        print(
            f"\ninterrupted: finished epochs are saved in {run_dir}; the same command continues from there "
            "(trainer.backup), or add trainer.resume=true",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    if problem := check_overrides(sys.argv[1:]):
        sys.exit(f"error: {problem}")
    main()
