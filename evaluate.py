"""Score a run on the validation split exactly as the KITTI road devkit does: MaxF, AP, PRE, REC, ...

    python evaluate.py                                   # newest run, synthetic validation split
    python evaluate.py dataset=kitti eval.run=outputs/2026-11-25/10-00-00 eval.space=bev
    python evaluate.py dataset=kitti eval.pred_dir=my_maps/   # any method's 8-bit maps, no model

Predicts each validation image at its native resolution, writes the 8-bit road maps (maps/, named as the
benchmark expects), scores them and prints one table per run; scores.json holds the same numbers.
"""

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segnet import errors, runs
from segnet.config import EvaluateConfig, check_overrides, register

register()


def evaluate(cfg, out: Path) -> dict:
    from PIL import Image

    from segnet import config, data, metrics, predict

    config.validate(cfg, EvaluateConfig)
    e = cfg.eval
    root = data.prepare(cfg.dataset)
    gt_dir = e.gt_dir or root / "training" / "gt_image_2"
    calib_dir = root / "training" / "calib" if e.space == "bev" else None
    if e.pred_dir:
        names = [p.name for p in Path(gt_dir).glob(f"*_{cfg.dataset.task}_*.png")]
        return metrics.evaluate_folder(e.pred_dir, gt_dir, calib_dir, e.space, names=names)

    samples = data.list_samples(root, "training", cfg.dataset.categories, cfg.dataset.task)
    _, val = data.split_samples(samples, cfg.dataset)
    if not val:
        raise errors.DatasetError(f"the validation split of {root} is empty; set dataset.val_per_category")
    model = predict.load(e.run, cfg.outputs, precision=e.precision)
    print(
        f"model {predict.model_path(e.run, cfg.outputs)} in {model.precision}" + (", mirror-averaged" if e.flip else "")
    )
    maps = out / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    for s in val:  # one at a time: KITTI frames differ in size, and this keeps memory flat
        (prob,) = predict.predict(model, [data.read_image(s.image)], flip=e.flip)
        Image.fromarray(metrics.to_uint8_prob(prob)).save(maps / s.gt.name)
    return metrics.evaluate_folder(maps, gt_dir, calib_dir, e.space, names=[s.gt.name for s in val])


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from segnet import metrics

    out = Path(HydraConfig.get().runtime.output_dir)
    with errors.reported(debug=HydraConfig.get().verbose):  # hydra.verbose=true: the full traceback
        results = evaluate(cfg, out)
    (out / "scores.json").write_text(json.dumps(results, indent=1))
    print(f"{cfg.eval.space}, in percent (BestThresh in [0, 1]):")
    print(metrics.format_table(results))
    print(f"scores: {out / 'scores.json'}")


if __name__ == "__main__":
    with errors.reported():  # before Hydra starts: a typo in a key, outputs that cannot be written
        if problem := check_overrides(sys.argv[1:], EvaluateConfig):
            raise errors.ConfigError(problem)
        runs.check_outputs(sys.argv[1:])
    main()
