"""How long a user waits for a config or dataset error: wall seconds from starting the recipe to its exit.

    python benchmarks/startup_to_error.py                  # this checkout, 5 runs of each case
    python benchmarks/startup_to_error.py --root OTHER     # another checkout (e.g. an older commit), same cases

Cases: a config with a misspelt key (exit 2), and a dataset with a truncated PNG (exit 3), each for
train_network.py and train_db.py. Prints the median and the slowest of the runs; the README records the
figures of the 2-core machine.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_cases(folder: Path, model: Path) -> dict[str, tuple[Path, int]]:
    """The two broken inputs: {name: (config path, expected exit code)}."""
    from library.tiny import make_dataset

    data = make_dataset(folder / "data")
    (data / "99_broken.png").write_bytes((data / "00_red_circle.png").read_bytes()[:60])
    common = (f'[model]\npretrained_model_name_or_path = "{model}"\n'
              f'[dataset]\ntrain_data_dir = "{data}"\nresolution = 64\n'
              f'[train]\noutput_dir = "{folder / "out"}"\n')
    typo = folder / "typo.toml"
    typo.write_text(common + "max_train_step = 10\n")
    bad_image = folder / "bad_image.toml"
    bad_image.write_text(common)
    return {"config error (misspelt key)": (typo, 2), "dataset error (truncated PNG)": (bad_image, 3)}


def time_run(root: Path, recipe: str, config: Path) -> tuple[float, int]:
    """(wall seconds, exit code) of one run."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, str(root / recipe), "--config", str(config)], cwd=root,
                         capture_output=True, text=True)
    return time.perf_counter() - started, run.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose recipes are timed")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from library.tiny import save_tiny_sd1

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, _ = save_tiny_sd1(folder / "tiny-sd1")
        cases = write_cases(folder, model)
        print(f"{'case':34} {'recipe':18} {'median s':>9} {'slowest s':>10}  exit (expected)")
        for name, (config, code) in cases.items():
            for recipe in ("train_network.py", "train_db.py"):
                runs = [time_run(args.root, recipe, config) for _ in range(args.runs)]
                times, codes = [t for t, _ in runs], sorted({c for _, c in runs})
                print(f"{name:34} {recipe:18} {statistics.median(times):9.2f} {max(times):10.2f}  "
                      f"{','.join(map(str, codes))} ({code})")


if __name__ == "__main__":
    main()
