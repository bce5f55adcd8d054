"""Supervised fine-tuning that proves learning on a CPU in minutes: a deterministic instruction set
generated from the bundled text, the default base model fine-tuned on it with config/sft.py, and
exact-match accuracy on held-out questions before and after.

    python bench/chat_demo.py [--base out/default] [--out out/chat_demo] [--steps 600] [--seeds 3]

Four tasks, each question and answer made from data/tinyshakespeare.txt with a fixed seed: who
speaks a line (the speaker's name as the text writes it), repeat three common words, reverse
them, add two numbers below 20. Each task gives the same number of training conversations, its
questions repeated when it has fewer (the sums). The held-out questions are never among the
training ones. The base model is `--base`, trained first when it is not there: `python
train.py` (the default model and recipe) for `--base-steps` steps. `--seeds N` fine-tunes it N
times, with seeds 0 to N-1 (the order of the conversations and dropout), and prints each run and
the median of each column.
"""

import argparse
import itertools
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from infra import chat, checkpoint, hf  # noqa: E402
from infra.inference import load_checkpoint  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from sample import generate  # noqa: E402

TASKS = ("speaker", "repeat", "reverse", "add")


def instructions(text: str, seed: int = 0) -> dict:
    """{task: [(question, answer), ...]}: every question of a task distinct."""
    rng = random.Random(seed)
    speeches = re.findall(r"\n\n([A-Z][A-Za-z ]+):\n([^\n]+)", text)
    speakers = Counter(name for name, _ in speeches)
    main = {name for name, n in speakers.items() if n >= 60}  # the main characters
    lines = sorted({(line.strip(), name) for name, line in speeches if name in main})
    counts = Counter(re.findall(r"\b[a-z]{3,6}\b", text))
    words = sorted(w for w, _ in counts.most_common(1500))  # the common ones, in a fixed order
    tasks = {
        "speaker": [(f'Who says: "{line}"?', name) for line, name in lines],
        "repeat": [],
        "reverse": [],
        "add": [(f"What is {a} + {b}?", str(a + b)) for a in range(20) for b in range(20)],
    }
    for _ in range(3000):
        three = rng.sample(words[:300], 3)
        tasks["repeat"].append((f"Repeat the words: {' '.join(three)}", " ".join(three)))
        three = rng.sample(words[:300], 3)
        tasks["reverse"].append((f"Reverse the words: {' '.join(three)}", " ".join(three[::-1])))
    for pairs in tasks.values():
        rng.shuffle(pairs)
    return {task: list(dict(pairs).items()) for task, pairs in tasks.items()}


def split(tasks: dict, held_out: int, train_per_task: int):
    """The first `held_out` questions of each task for the test, train_per_task of the others
    (cycled through when there are fewer) for training."""
    train, test = [], []
    for task, pairs in tasks.items():
        test += [(task, q, a) for q, a in pairs[:held_out]]
        train += list(itertools.islice(itertools.cycle(pairs[held_out:]), train_per_task))
    random.Random(1).shuffle(train)
    return train, test


@torch.no_grad()
def accuracy(model, tokenizer, test) -> dict:
    """Exact-match accuracy per task and overall, greedy, a reply at most 24 tokens."""
    template = tokenizer.chat_template
    stop = template.end_of_turn(tokenizer)
    right = {task: 0 for task in TASKS}
    for task, question, answer in test:
        prompt = template.encode(tokenizer, [{"role": "user", "content": question}], True)[0]
        reply = generate(
            model, prompt, 24, temperature=0, eos_id=stop, vocab_size=tokenizer.vocab_size
        )
        right[task] += tokenizer.decode(reply[0]).strip() == answer
    per_task = {task: right[task] / sum(t == task for t, _, _ in test) for task in TASKS}
    return {**per_task, "all": sum(right.values()) / len(test)}


def base_as_chat_model(base: Path):
    """The base model with the ChatML tokenizer and its two new rows (as fine-tuning starts)."""
    tokenizer = chat.chat_tokenizer(base)
    config = checkpoint.safe_load(checkpoint.latest(base, sharded=False))["config"]["model"]
    config["vocab_size"] = max(config["vocab_size"], tokenizer.vocab_size)
    model = Transformer(ModelConfig(**config))
    hf.load_weights(model, base, verbose=False, new_rows=True)
    return model.eval(), tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="out/default", help="the base run (trained if absent)")
    parser.add_argument("--out", default="out/chat_demo", help="instructions, data and the run")
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps")
    parser.add_argument("--held-out", type=int, default=50, help="test questions per task")
    parser.add_argument("--base-steps", type=int, default=800, help="when the base is trained")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning runs, seeds 0 to N-1")
    args = parser.parse_args()
    if args.seeds < 1 or args.steps < 1 or args.held_out < 1:
        parser.error("--seeds, --steps and --held-out must be at least 1")
    base, out = Path(args.base), Path(args.out)
    if checkpoint.latest(base, sharded=False) is None:
        command = ["train.py", f"--out_dir={base.resolve()}", f"--max_steps={args.base_steps}"]
        print(f"training the base model: python {' '.join(command)}", flush=True)
        subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()
    train, test = split(instructions(text), args.held_out, train_per_task=2000)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "data", ignore_errors=True)  # prepared again from the instructions below
    with open(out / "train.jsonl", "w") as f:
        for question, answer in train:
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    print(f"{len(train):,} training conversations, {len(test):,} held-out questions", flush=True)

    columns = (*TASKS, "all")

    def show(name, result):  # a row of the table, printed as soon as it is known
        print(f"{name} | " + " | ".join(f"{result[c]:.0%}" for c in columns), flush=True)

    print("exact match | " + " | ".join(columns))
    show("before", accuracy(*base_as_chat_model(base), test))
    runs = []
    for seed in range(args.seeds):
        began = time.time()
        command = [sys.executable, "train.py", "config/sft.py", f"--init_from={base.resolve()}"]
        command += [
            f"--inputs={(out / 'train.jsonl').resolve()}",
            f"--data_dir={(out / 'data').resolve()}",
            f"--out_dir={(out / f'sft-seed{seed}').resolve()}",
            f"--max_steps={args.steps}",
            f"--seed={seed}",
            "--overwrite",
        ]
        subprocess.run(command, cwd=ROOT, check=True)
        prepared = " (data preparation included)" if seed == 0 else ""
        print(f"fine-tuning with seed {seed}: {time.time() - began:.0f} s{prepared}", flush=True)
        runs.append(accuracy(*load_checkpoint(out / f"sft-seed{seed}")[:2], test))
        show(f"after, seed {seed}", runs[-1])
    if args.seeds > 1:
        median = {c: statistics.median(run[c] for run in runs) for c in columns}
        show(f"after, median of {args.seeds}", median)


if __name__ == "__main__":
    main()
