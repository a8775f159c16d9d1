#!/usr/bin/env python3
"""Read a finished run's history and summary and print when it reached each accuracy.

    python3 benchmarks/time_to_accuracy.py results/mnist_seed42
    python3 benchmarks/time_to_accuracy.py results/mnist_seed42 --targets 99.5 99.6 99.7

The argument is the run's file prefix inside its results folder: the script
reads PREFIX_history.json and, if present, PREFIX_summary.json. Minutes count
training time only (each epoch's seconds, validation included), summed from
epoch 1; the ensemble line adds the ensemble's own time. Accuracy is of the
validation split. Nothing is trained here, so the figures are as good as the
run that wrote the files: time it alone on the machine.
"""

import argparse
import json
import sys
from pathlib import Path


def load(prefix: Path) -> tuple[list[dict], dict | None]:
    history_path = Path(f"{prefix}_history.json")
    if not history_path.is_file():
        sys.exit(f"{history_path}: not found; give the prefix of a finished run, such as results/mnist_seed42")
    history = json.loads(history_path.read_text())["history"]
    summary_path = Path(f"{prefix}_summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return history, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prefix", type=Path, help="results folder plus file prefix, e.g. results/mnist_seed42")
    parser.add_argument("--targets", type=float, nargs="+", default=[99.5, 99.6, 99.7],
                        help="validation accuracies to look for, in %% (default: 99.5 99.6 99.7)")
    args = parser.parse_args()
    history, summary = load(args.prefix)

    minutes, first_reached = 0.0, {}
    print(f"{'epoch':>5} {'minutes':>8} {'val acc %':>10}")
    for record in history:
        minutes += record["seconds"] / 60
        accuracy = record["val_acc"]
        print(f"{record['epoch']:>5} {minutes:>8.1f} {accuracy if accuracy is None else round(accuracy, 2):>10}")
        for target in args.targets:
            if accuracy is not None and accuracy >= target and target not in first_reached:
                first_reached[target] = (f"epoch {record['epoch']}", minutes)
    if summary is not None and summary.get("ensemble_val_acc") is not None:
        minutes += summary["seconds"]["ensemble"] / 60
        accuracy = summary["ensemble_val_acc"]
        print(f"{'ens.':>5} {minutes:>8.1f} {round(accuracy, 2):>10}")
        for target in args.targets:
            if accuracy >= target and target not in first_reached:
                first_reached[target] = ("ensemble", minutes)
    for target in args.targets:
        if target in first_reached:
            where, when = first_reached[target]
            print(f"{target:.2f} %: reached at {where}, after {when:.1f} min")
        else:
            print(f"{target:.2f} %: not reached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
