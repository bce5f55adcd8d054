"""Does the run's own val tell the truth? Its curve against text nobody trained on, side by side.

    python bench/bench_val_split.py [--commit HEAD] [extra train.py arguments]

Trains `python train.py` (a fresh clone of `--commit`, its default recipe) on the first 90% of
tinyshakespeare, evaluating and saving every 25 steps, and scores every checkpoint on the last 10%
(nanoGPT's val split, which no run here trains on) with infra/score.py, as
`python sample.py --ckpt CKPT --score FILE` does. Prints both curves in bits per byte, the step
where each is best, and the final gap between them. Then the final model scores each tenth of the
whole corpus: the spread between tenths is how much a score moves with the text alone, the yardstick
for that gap.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVERY = 25  # steps between evaluations and checkpoints


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="HEAD", help="the commit to measure (committed code)")
    args, extra = parser.parse_known_args()
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # nanoGPT's split, in characters (the text is ASCII)
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", args.commit], cwd=clone, check=True)
        (clone / "head90.txt").write_text(text[:cut], encoding="utf-8")
        run_dir = clone / "out" / "head90"
        command = [
            sys.executable,
            "train.py",
            "--inputs=head90.txt",
            "--data_dir=out/data/head90",
            f"--out_dir={run_dir}",
            f"--eval_interval={EVERY}",
            f"--ckpt_interval={EVERY}",
            "--keep_checkpoints=1000",
            "--sample_tokens=0",
            *extra,
        ]
        start = time.time()
        subprocess.run(command, cwd=clone, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - start
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        own = {r["step"]: r["val_bpb"] for r in log if r.get("event") == "eval"}
        # scored by the clone's own code, as its sample.py --score would
        sys.path.insert(0, str(clone))
        from infra.inference import load_checkpoint
        from infra.score import score_text

        held, seconds = {}, {}
        for ckpt in sorted(run_dir.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1])):
            model, tokenizer, _ = load_checkpoint(str(ckpt), "cpu")
            step = int(ckpt.stem.split("-")[1])
            held[step] = score_text(model, tokenizer, text[cut:])["bpb"]
            seconds[step] = ckpt.stat().st_mtime - start
        tenths = [
            score_text(model, tokenizer, text[k * len(text) // 10 : (k + 1) * len(text) // 10])[
                "bpb"
            ]
            for k in range(10)
        ]
    print(f"whole run {wall:.0f} s")
    print(f"{'step':>6} {'seconds':>8} {'run val':>8} {'last 10%':>9}   (bits per byte)")
    for step in sorted(held):
        print(
            f"{step:>6} {seconds[step]:>8.0f} {own.get(step, float('nan')):>8.4f} "
            f"{held[step]:>9.4f}"
        )
    best_own, best_held = min(own, key=own.get), min(held, key=held.get)
    final = max(held)
    print(
        f"best step: run val {best_own} ({own[best_own]:.4f}), last 10% {best_held} "
        f"({held[best_held]:.4f}); {abs(best_own - best_held)} steps apart"
    )
    print(f"final gap, last 10% - run val: {held[final] - own[final]:+.4f} bits/byte")
    print("final model on each tenth of the corpus: " + " ".join(f"{b:.3f}" for b in tenths))
    print(
        f"spread between tenths: {max(tenths) - min(tenths):.4f} bits/byte "
        f"(first - last: {tenths[0] - tenths[-1]:+.4f})"
    )


if __name__ == "__main__":
    main()
