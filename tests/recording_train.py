"""train.py with a recording callback, for the CLI tests (run as a script, also under msrun).

    python tests/recording_train.py RECORD_DIR [train.py flags...]

Each rank writes into RECORD_DIR: rank_<r>_batches.jsonl (per training step: epoch, labels, per-image
channel means), rank_<r>_start.ckpt (the whole train network, i.e. weights and optimizer state, just
before the first step: after a resume, what was restored) and rank_<r>_final.ckpt (the same at the end).
"""
import importlib.util
import json
import sys
from pathlib import Path

import mindspore as ms
from mindspore.train import Callback

REPO = Path(__file__).resolve().parent.parent


class BatchRecorder(Callback):
    def __init__(self, folder: Path, distributed: bool):
        super().__init__()
        self.folder = folder
        self.distributed = distributed
        self.rank = 0

    def on_train_begin(self, run_context):
        if self.distributed:
            from mindspore.communication import get_rank

            self.rank = get_rank()
        self.folder.mkdir(parents=True, exist_ok=True)
        ms.save_checkpoint(run_context.original_args().train_network, str(self.folder / f"rank_{self.rank}_start.ckpt"))

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        images, labels = (t.asnumpy() for t in cb_params.train_dataset_element)
        line = {"epoch": cb_params.cur_epoch_num, "labels": labels.tolist(),
                "means": images.mean(axis=(2, 3)).round(4).tolist()}
        with open(self.folder / f"rank_{self.rank}_batches.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_end(self, run_context):
        ms.save_checkpoint(run_context.original_args().train_network, str(self.folder / f"rank_{self.rank}_final.ckpt"))


def main() -> int:
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from vit_ms.training import train

    cfg, _ = script.parse_config(sys.argv[2:])
    result = train(cfg, callbacks=[BatchRecorder(Path(sys.argv[1]), cfg.distributed)])
    if result.rank == 0:
        print(f"best val top-1 {100 * result.best_top1:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
