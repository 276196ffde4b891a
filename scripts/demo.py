"""The demo: distillation on the built-in synthetic set, on a CPU, in 2.5-3.5 minutes (2 cores).

1. trains a teacher (resnet14, 6 epochs);
2. trains the student (resnet8, 3 epochs) alone, with cross-entropy;
3. distils the same student for the same 3 epochs with KD, CRD and CRD+KD from that teacher;
4. prints the table of test top-1 accuracies and writes it to ``save/demo/demo_table.md``.

Run it with ``make demo`` (or ``python scripts/demo.py`` from the repository root). Every run
is an ordinary ``train_teacher.py`` / ``train_student.py`` run; their folders are in ``save/demo/``.
The data is the synthetic set at difficulty 0.5 (100 classes, 8,000 training and 2,000 test
images), where these short runs learn well above chance (1%).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.logger import write_json  # noqa: E402
import train_student  # noqa: E402
import train_teacher  # noqa: E402

TEACHER, TEACHER_EPOCHS = "resnet14", 6
STUDENT, STUDENT_EPOCHS = "resnet8", 3
DATA = ["--dataset", "synthetic", "--synthetic_difficulty", "0.5", "--synthetic_train", "80", "--num_workers", "0", "--seed", "1"]
SCHEDULE = ["--lr_schedule", "cosine", "--learning_rate", "0.1"]
AGAIN = ["--overwrite"]  # a second `make demo` trains its runs again
# (row label, --distill, -r, -a, -b); the student alone is a train_teacher.py run.
STUDENT_RUNS = [
    ("KD", "kd", "0.1", "0.9", "0"),
    ("CRD", "crd", "1", "0", "0.8"),
    ("CRD+KD", "crd", "1", "1", "0.8"),
]
NCE_K = "512"  # negatives per anchor: the paper's 16384 is more than this small set holds per class


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_folder", default=str(ROOT / "save" / "demo"))
    parser.add_argument("--teacher_only", action="store_true", help="stop after training the teacher")
    args = parser.parse_args(argv)
    folder = Path(args.save_folder)
    start = time.time()

    def epochs(n: int) -> list[str]:
        return ["--epochs", str(n), "--save_freq", str(n)]

    teacher = train_teacher.main(["--model", TEACHER, *DATA, *SCHEDULE, *epochs(TEACHER_EPOCHS), *AGAIN,
                                  "--save_folder", str(folder / "teacher")])
    rows = [dict(run="teacher", model=TEACHER, flags="cross-entropy", results=teacher)]
    if not args.teacher_only:
        alone = train_teacher.main(["--model", STUDENT, *DATA, *SCHEDULE, *epochs(STUDENT_EPOCHS), *AGAIN,
                                    "--save_folder", str(folder / "student")])
        rows.append(dict(run="student alone", model=STUDENT, flags="cross-entropy", results=alone))
        teacher_ckpt = next((folder / "teacher").glob(f"{TEACHER}_*/{TEACHER}_last.pth"))
        for label, distill, gamma, alpha, beta in STUDENT_RUNS:
            flags = ["--distill", distill, "-r", gamma, "-a", alpha, "-b", beta]
            results = train_student.main(["--path_t", str(teacher_ckpt), "--model_s", STUDENT, *flags,
                                          "--nce_k", NCE_K, *DATA, *SCHEDULE, *epochs(STUDENT_EPOCHS), *AGAIN,
                                          "--save_folder", str(folder / "student")])
            rows.append(dict(run=f"student + {label}", model=STUDENT, flags=" ".join(flags), results=results))

    table = ["| run | model | flags | test top-1 (%) | time (s) |", "|---|---|---|---|---|"]
    table += [f"| {r['run']} | {r['model']} | `{r['flags']}` | {r['results']['last_acc']:.2f} "
              f"| {r['results']['wall_time_s']:.0f} |" for r in rows]
    table.append("| chance | - | - | 1.00 | - |")
    print("\n".join(["", "RepDistill demo: synthetic set (100 classes), CPU", *table,
                     f"\n{time.time() - start:.0f} s in all; runs in {folder}"]), flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo_table.md").write_text("\n".join(table) + "\n")
    write_json(folder / "demo_results.json", rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
