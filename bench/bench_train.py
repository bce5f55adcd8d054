"""Training figures of the default config on this machine.

    python bench/bench_train.py              # throughput: median tokens/s and FLOP/s of several short runs
    python bench/bench_train.py --full       # also the whole default `python train.py`: val bpb against wall time

Each run is a fresh `python train.py` process, as a user would start it; the data is prepared
once beforehand so that its cost is not in the figures.
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
    subprocess.run([sys.executable, "train.py", f"--out_dir={out_dir}", *overrides], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return log, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--full", action="store_true", help="also run the whole default training once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train(f"{tmp}/prepare", "--max_steps=1", "--sample_tokens=0")
        rates, flops = [], []
        for run in range(args.runs):
            log, _ = train(f"{tmp}/run{run}", f"--max_steps={args.steps}", "--sample_tokens=0",
                           f"--log_interval={args.steps // 3}", f"--eval_interval={10 * args.steps}")
            steps = [r for r in log if "tokens_per_s" in r][1:]  # the first interval includes warm-up
            rates.append(statistics.median(r["tokens_per_s"] for r in steps))
            flops.append(statistics.median(r["flops_per_s"] for r in steps))
        print(f"default config, {args.runs} runs of {args.steps} steps: median {statistics.median(rates):,.0f} tokens/s"
              f" (runs: {', '.join(f'{r:,.0f}' for r in rates)}), {statistics.median(flops) / 1e9:.1f} GFLOP/s")
        if args.full:
            log, seconds = train(f"{tmp}/full")
            print(f"\nfull default run: {seconds:.0f} s wall clock in all (data already prepared)")
            print(f"{'step':>6} {'train s':>8} {'val nats/token':>15} {'val bpb':>8}")
            for record in (r for r in log if r.get("event") == "eval"):
                print(f"{record['step']:>6} {record['elapsed_s']:>8.0f} {record['val_loss']:>15.4f}"
                      f" {record['val_bpb']:>8.4f}")


if __name__ == "__main__":
    main()
