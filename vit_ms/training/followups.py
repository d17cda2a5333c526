"""The tutorial's steps after fine-tuning, in-process on best.ckpt: evaluate on val, predict the images
in infer/, export MINDIR. The same library functions eval.py, infer.py and export.py call."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .. import files

logger = logging.getLogger(__name__)


def run_followups(cfg, result, data_root: Optional[Path] = None) -> dict:
    """Evaluate best.ckpt on val, predict ROOT/infer/*, export MINDIR; returns the three outputs' paths.

    Writes output_dir/eval/metrics.json, output_dir/infer/predictions.json and output_dir/vit.mindir
    (with its vit.mindir.json sidecar).

    Args:
        cfg: the run's TrainConfig (data location, batch size, workers).
        result: what `train` returned (output_dir, best_checkpoint).
        data_root: the ImageFolder root; default: resolved from `cfg` again.
    """
    from ..evaluate import evaluate_folder, find_images, load_classifier, run_inference, write_predictions
    from ..export import export_model
    from .loop import resolve_data_root

    root = Path(data_root) if data_root is not None else resolve_data_root(cfg)
    out = Path(result.output_dir)
    classifier = load_classifier(result.best_checkpoint)

    logger.info("follow-up: evaluating %s on %s", result.best_checkpoint, root / "val")
    evaluation = evaluate_folder(classifier, root, "val", batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    metrics = dict(evaluation.to_dict(), checkpoint=str(result.best_checkpoint))
    eval_file = files.write_text_atomic(out / "eval" / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    logger.info("follow-up: val top-1 %.2f%%, cross-entropy %.4f -> %s", 100 * evaluation.top_1,
                evaluation.cross_entropy, eval_file)

    # What `infer.py --input ROOT/infer --output_dir RUN/infer` writes: predictions and annotated pictures.
    paths, skipped = find_images([str(root / "infer")]) if (root / "infer").is_dir() else ([], [])
    inference = run_inference(classifier, paths, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              out_dir=out / "infer")
    inference.skipped = skipped + inference.skipped
    infer_file, _ = write_predictions(inference, out / "infer")
    logger.info("follow-up: %d image(s) predicted -> %s", len(inference.predictions), infer_file)

    # The run folder is this run's own (train.py refused a folder holding another run), so a MINDIR there
    # is from an earlier attempt at this same run.
    report = export_model(classifier.net, out / "vit.mindir", classifier.metadata(), overwrite=True)
    logger.info("follow-up: exported %s", report.path)
    return {"eval": eval_file, "infer": infer_file, "export": report.path}


__all__ = ["run_followups"]
