"""The demo: train a teacher on the built-in synthetic set and report its test accuracy.

Run with ``make demo`` (or ``python scripts/demo.py`` from the repository root). Everything
runs on the CPU in a few minutes and writes into ``save/demo/``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_teacher  # noqa: E402
from helper.logger import write_json  # noqa: E402

TEACHER = "resnet20"
EPOCHS = 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_folder", default=str(ROOT / "save" / "demo"))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--model", default=TEACHER)
    args = parser.parse_args(argv)

    start = time.time()
    results = train_teacher.main([
        "--model", args.model, "--dataset", "synthetic", "--epochs", str(args.epochs),
        "--lr_schedule", "cosine", "--learning_rate", "0.1", "--batch_size", "64",
        "--num_workers", "0", "--save_freq", str(args.epochs), "--save_folder", args.save_folder,
    ])
    chance = 100.0 / results["args"].get("num_classes", 100)
    table = [
        "| run | model | test top-1 (%) | best top-1 (%) |",
        "|---|---|---|---|",
        f"| teacher | {args.model} | {results['last_acc']:.2f} | {results['best_acc']:.2f} |",
        f"| chance | - | {chance:.2f} | - |",
    ]
    print("\n".join(["", "RepDistill demo on the synthetic set", *table,
                     f"\n{time.time() - start:.0f} s in all; runs in {args.save_folder}"]))
    Path(args.save_folder).mkdir(parents=True, exist_ok=True)
    (Path(args.save_folder) / "demo_table.md").write_text("\n".join(table) + "\n")
    write_json(Path(args.save_folder) / "demo_results.json", {"teacher": results})


if __name__ == "__main__":
    main(sys.argv[1:])
