"""Training figures of the default config on this machine.

    python bench/bench_train.py                      # throughput: median tokens/s and FLOP/s
                                                     # of several short runs
    python bench/bench_train.py --full               # the whole default `python train.py`: val
                                                     # bpb against time
    python bench/bench_train.py --against COMMIT     # whole default runs of HEAD and of COMMIT,
                                                     # alternately
    python ../shared/peers/vs_nanogpt.py             # time to nanoGPT's final val bpb, against
                                                     # its CPU recipe

Throughput runs are fresh `python train.py` processes, as a user would start them, on data prepared
once beforehand. --full and --against run the whole command in a fresh clone of a commit (data
preparation and the final sample included), so commit before measuring; --against alternates the two
commits --runs times, so that both see the same machine load, and prints their ratio.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root, where train.py runs


def train(out_dir, *overrides) -> tuple[list[dict], float]:
    start = time.time()
    subprocess.run(
        [sys.executable, "train.py", f"--out_dir={out_dir}", *overrides],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    log = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return log, time.time() - start


def whole_run(commit: str, folder: Path) -> tuple[list[dict], float, str]:
    """`python train.py` in a fresh clone of `commit`: its log, wall seconds and the sample it
    printed."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=folder, check=True)
    start = time.time()
    out = subprocess.run(
        [sys.executable, "train.py"], cwd=folder, check=True, capture_output=True, text=True
    ).stdout
    seconds = time.time() - start
    log = [json.loads(line) for line in (folder / "out/default/log.jsonl").read_text().splitlines()]
    return log, seconds, out.split("--- sample ---\n")[-1].split("\n-----")[0]


def eval_table(log: list[dict]):
    print(f"{'step':>6} {'train s':>8} {'val nats/token':>15} {'val bpb':>8}")
    for record in (r for r in log if r.get("event") == "eval"):
        print(
            f"{record['step']:>6} {record['elapsed_s']:>8.0f} {record['val_loss']:>15.4f} "
            f"{record['val_bpb']:>8.4f}"
        )


def throughput(runs: int, steps: int):
    with tempfile.TemporaryDirectory() as tmp:
        train(f"{tmp}/prepare", "--max_steps=1", "--sample_tokens=0")
        rates, flops = [], []
        for run in range(runs):
            log, _ = train(
                f"{tmp}/run{run}",
                f"--max_steps={steps}",
                "--sample_tokens=0",
                f"--log_interval={steps // 3}",
                f"--eval_interval={10 * steps}",
            )
            # the first interval includes warm-up
            intervals = [r for r in log if "tokens_per_s" in r][1:]
            rates.append(statistics.median(r["tokens_per_s"] for r in intervals))
            flops.append(statistics.median(r["flops_per_s"] for r in intervals))
        dtype = next(r["dtype"] for r in log if r.get("event") == "start")
        print(
            f"default config ({dtype}), {runs} runs of {steps} steps: median "
            f"{statistics.median(rates):,.0f} tokens/s "
            f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}), "
            f"{statistics.median(flops) / 1e9:.1f} GFLOP/s"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--full", action="store_true", help="run the whole default training of HEAD once"
    )
    parser.add_argument(
        "--against", metavar="COMMIT", help="whole default runs of HEAD and COMMIT, alternately"
    )
    args = parser.parse_args()
    if not (args.full or args.against):
        throughput(args.runs, args.steps)
        return
    commits = ["HEAD"] + ([args.against] if args.against else [])
    seconds, logs = {commit: [] for commit in commits}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs if args.against else 1):
            for commit in commits if run % 2 == 0 else commits[::-1]:
                logs[commit], wall, sample = whole_run(commit, Path(tmp) / f"{commit}-{run}")
                seconds[commit].append(wall)
                final = [r for r in logs[commit] if r.get("event") == "eval"][-1]
                print(
                    f"{commit}: {wall:.0f} s wall clock in all, final val "
                    f"{final['val_bpb']:.4f} bits/byte "
                    f"({final['val_loss']:.4f} nats/token) at step {final['step']}",
                    flush=True,
                )
    print("\nHEAD, validation during the whole run from a fresh clone (seconds of training):")
    eval_table(logs["HEAD"])
    if not args.against:
        print(f"\nthe sample it ended with:\n{sample}")
    else:
        ratios = ", ".join(f"{new / old:.2f}" for new, old in zip(*seconds.values()))
        medians = [statistics.median(seconds[name]) for name in ("HEAD", args.against)]
        print(
            f"\nwall clock, HEAD / {args.against}: {ratios} (medians {medians[0]:.0f} s and "
            f"{medians[1]:.0f} s)"
        )


if __name__ == "__main__":
    main()
