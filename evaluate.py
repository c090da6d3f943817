"""Score a run on the validation split exactly as the KITTI road devkit does: MaxF, AP, PRE, REC, ...

    python evaluate.py                                   # newest run, synthetic validation split
    python evaluate.py dataset=kitti eval.run=outputs/2026-11-25/10-00-00 eval.space=bev
    python evaluate.py dataset=kitti eval.pred_dir=my_maps/   # any method's 8-bit maps, no model
    python evaluate.py dataset=folder dataset.root=my_data   # your own data: IoU per class, mIoU

Predicts each validation image at its native resolution. KITTI: writes the 8-bit road maps (maps/, named as
the benchmark expects) and scores them. The folder layout: IoU, precision and recall per class, mean IoU,
pixel accuracy and the confusion matrix (and, for two classes, the KITTI measures of class 1 as "all").
scores.json holds the same numbers as the printed table.
"""

import json
import sys
from pathlib import Path

import hydra
import numpy as np
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
    if cfg.dataset.layout != "kitti" and (e.pred_dir or e.space == "bev"):
        raise errors.ConfigError("eval.pred_dir and eval.space=bev score KITTI road maps: use them with dataset=kitti")
    root = data.prepare(cfg.dataset)
    gt_dir = e.gt_dir or root / "training" / "gt_image_2"
    calib_dir = root / "training" / "calib" if e.space == "bev" else None
    if e.pred_dir:
        names = [p.name for p in Path(gt_dir).glob(f"*_{cfg.dataset.task}_*.png")]
        return metrics.evaluate_folder(e.pred_dir, gt_dir, calib_dir, e.space, names=names)

    _, val = data.split_samples(data.training_samples(root, cfg.dataset), cfg.dataset)
    if not val:
        raise errors.DatasetError(f"the validation split of {root} is empty; set dataset.val_per_category")
    model = predict.load(e.run, cfg.outputs, precision=e.precision)
    names = [n for n, _ in data.class_list(cfg.dataset)]
    if [n for n, _ in model.classes] != names:
        raise errors.UserError(
            f"the model predicts {[n for n, _ in model.classes]}, the dataset's classes are {names}: "
            "evaluate with the dataset config it was trained with"
        )
    print(f"model {runs.model_path(e.run, cfg.outputs)} in {model.precision}" + (", mirror-averaged" if e.flip else ""))
    if cfg.dataset.layout == "folder":
        return class_results(model, val, cfg.dataset, e.flip)
    maps = out / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    for s in val:  # one at a time: KITTI frames differ in size, and this keeps memory flat
        (prob,) = predict.predict(model, [data.read_image(s.image)], flip=e.flip)
        Image.fromarray(metrics.to_uint8_prob(prob[..., 1])).save(maps / s.gt.name)
    return metrics.evaluate_folder(maps, gt_dir, calib_dir, e.space, names=[s.gt.name for s in val])


def class_results(model, val, d, flip: bool) -> dict:
    """Per-class scores and the confusion matrix of a folder dataset's validation images (for two classes
    also the KITTI measures of class 1, pooled over the images, as "all")."""
    from segnet import data, metrics, predict

    names, read = [name for name, _ in data.class_list(d)], data.label_reader(d)
    n = len(names)
    cm, counts = np.zeros((n, n), np.int64), metrics.Counts()
    for s in val:
        (prob,) = predict.predict(model, [data.read_image(s.image)], flip=flip)
        label = read(s.gt)
        cm += metrics.confusion(label, prob.argmax(-1), n)
        if n == 2:
            valid = label != data.IGNORE
            counts = counts + metrics.image_counts(metrics.to_uint8_prob(prob[..., 1]), valid, label == 1)
    out = {"classes": metrics.class_scores(cm, names), "confusion": {"names": names, "matrix": cm.tolist()}}
    return out | ({"all": metrics.scores(counts)} if n == 2 else {})


def report(results: dict) -> str:
    """The KITTI table (per category), and the class table when there is a confusion matrix."""
    from segnet import metrics

    road = {k: v for k, v in results.items() if k not in ("classes", "confusion")}
    text = [metrics.format_table(road)] if road else []
    if "confusion" in results:
        c = results["confusion"]
        text.append(metrics.format_class_table(np.array(c["matrix"]), c["names"]))
    return "\n\n".join(text)


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    with errors.reported(debug=HydraConfig.get().verbose):  # hydra.verbose=true: the full traceback
        results = evaluate(cfg, out)
    (out / "scores.json").write_text(json.dumps(results, indent=1))
    print(f"{cfg.eval.space}, in percent (BestThresh in [0, 1]):")
    print(report(results))
    print(f"scores: {out / 'scores.json'}")


if __name__ == "__main__":
    with errors.reported():  # before Hydra starts: a typo in a key, outputs that cannot be written
        if problem := check_overrides(sys.argv[1:], EvaluateConfig):
            raise errors.ConfigError(problem)
        runs.check_outputs(sys.argv[1:])
    main()
