"""A cluster check before GPU hours are spent: each training mode for three steps, the 7B width for
speed.

    python bench/gpu_check.py [--out gpu_check.json] [--layers 4] [--steps 10] [--compile]

On a freshly provisioned CUDA machine (one node, all its GPUs) it runs the real `train.py`, under
torchrun for the distributed modes, on a corpus prepared from the bundled tinyshakespeare:

1. modes, three steps each of a small model: single process in fp32, in bf16, with activation
   checkpointing, DDP over the node's GPUs (with two or more), FSDP2 over them, and with --compile
   regional torch.compile. From one seed every mode starts from the same weights and trains on the
   same batches, so their losses must agree (to bf16's precision), or the check fails;
2. the 7B width (config/7b.py: dim 4096, FFN 11008, context 4096, FSDP, bf16, activation
   checkpointing) with --layers blocks: tokens/s, MFU, the peak memory against the estimate that
   `train.py --dry-run` prints, and the time to write its checkpoint;
3. KV-cache sampling: `sample.py` from a trained checkpoint, and decoding tokens/s at the 7B width.

Each check prints one line; all of them go to the JSON report. The exit status is 1 when a check
failed. It takes a few minutes on one GPU (under 5). On a CPU it runs the same checks at a small
width, DDP and FSDP on two gloo ranks, and says that its figures are not GPU figures: a quick test
of the script and of every mode (tests/test_speed.py runs it).
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root, where train.py runs
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from infra.configurator import load_config  # noqa: E402
from infra.memory import estimate_memory  # noqa: E402
from model import Transformer  # noqa: E402
from sample import generate  # noqa: E402

VOCAB = 512  # the tokenizer every check uses; the 7B-width model keeps its 32000-row tables
# Agreement of the losses (the same weights and batches in every mode): fp32 modes differ only in
# summation order; bf16 rounds every matmul input to 8 bits of mantissa.
FP32_TOLERANCE, BF16_TOLERANCE = 1e-3, 0.03


def small_model(cuda: bool, ranks: int) -> list[str]:
    """The model of the mode checks: the default model's shape on a GPU, a smaller one on a CPU.
    The global batch is a whole number of sequences per rank, so every mode trains on the same
    batches (about 16 sequences)."""
    shape = (
        {"dim": 192, "n_layers": 4, "n_heads": 6, "ffn_hidden": 512, "max_seq_len": 128}
        if cuda
        else {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_hidden": 128, "max_seq_len": 64}
    )
    return [f"--model.{key}={value}" for key, value in shape.items()] + [
        f"--model.vocab_size={VOCAB}",
        "--model.dropout=0.0",
        "--micro_batch_size=8",
        f"--global_batch_tokens={max(1, 16 // ranks) * ranks * shape['max_seq_len']}",
        "--lr=3e-3",
        "--warmup_steps=0",
    ]


def wide_model(cuda: bool, layers: int, ranks: int) -> list[str]:
    """config/7b.py with `layers` blocks, one micro-batch per rank per step; on a CPU at a small
    width. Its 32000-row tables take the check's small tokenizer (a model's vocabulary may be larger
    than its tokenizer's): tinyshakespeare holds too little text for a 32000-token BPE."""
    seq = 4096 if cuda else 256
    shape = (
        []
        if cuda
        else [
            "--model.dim=128",
            "--model.n_heads=4",
            "--model.n_kv_heads=4",
            f"--model.max_seq_len={seq}",
            "--model.vocab_size=2048",
        ]
    )
    return [
        "config/7b.py",
        f"--model.n_layers={layers}",
        *shape,
        "--micro_batch_size=2",
        f"--global_batch_tokens={2 * seq * ranks}",
        f"--eval_tokens={2 * seq}",
    ]


def make_tokenizer(work: Path, corpus: Path) -> Path:
    """The VOCAB-token tokenizer every check's data is encoded with."""
    path = work / "tokenizer.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.tokenizer_cli",
            "--input",
            str(corpus),
            "--vocab-size",
            str(VOCAB),
            "--out",
            str(path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return path


class Checker:
    """Runs the checks in `work` and collects their results for the report."""

    def __init__(self, work: Path, cuda: bool, ranks: int):
        self.work, self.cuda, self.ranks, self.results = work, cuda, ranks, []
        self.corpus = work / "corpus.txt"
        self.corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text())
        self.tokenizer = make_tokenizer(work, self.corpus)
        # two ranks share the cores
        self.env = os.environ if cuda else {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(self, name: str, overrides: list[str], nproc: int = 0, data: str = "data") -> list:
        """The `train.py` command of a check (under torchrun with `nproc` ranks), on the corpus
        prepared in work/`data` (one folder per model vocabulary)."""
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return [
            sys.executable,
            *(torchrun if nproc else []),
            "train.py",
            f"--inputs={self.corpus}",
            f"--tokenizer={self.tokenizer}",
            f"--data_dir={self.work / data}",
            f"--out_dir={self.work / name}",
            "--log_interval=1",
            "--sample_tokens=0",
            "--ckpt_interval=1000000",
            "--eval_interval=1000000",
            *overrides,
            *([] if self.cuda else ["--device=cpu"]),
        ]

    def train(self, name: str, overrides: list[str], nproc: int = 0, data: str = "data") -> list:
        """Run a check's `train.py`: its log records, or raises."""
        command = self.command(name, overrides, nproc, data)
        result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True)
        if result.returncode:  # train.py's own one-line error if it gave one, not torchrun's report
            output = result.stderr + result.stdout
            errors = [line for line in output.splitlines() if line.startswith("error:")]
            raise RuntimeError(
                f"exit status {result.returncode}: " + ("\n".join(errors) or output[-2000:])
            )
        return [
            json.loads(line) for line in (self.work / name / "log.jsonl").read_text().splitlines()
        ]

    @contextlib.contextmanager
    def check(self, name: str):
        """Times a check and records it: its figures are what the block puts in the yielded dict."""
        figures, start = {}, time.time()
        try:
            yield figures
            ok, error = True, None
        except Exception as exception:  # a failed check is reported, and the others still run
            ok, error = False, f"{type(exception).__name__}: {exception}"
        record = {"check": name, "ok": ok, "seconds": round(time.time() - start, 1), **figures}
        if error:
            record["error"] = error
        self.results.append(record)
        shown = ", ".join(
            f"{key} {value}"
            for key, value in figures.items()
            if not isinstance(value, (list, dict))
        )
        print(
            f"{'ok  ' if ok else 'FAIL'} {name} ({record['seconds']:.0f} s)"
            f"{': ' + shown if shown else ''}"
            + (
                f"\n     {error.splitlines()[-1] if error.splitlines() else error}" if error else ""
            ),
            flush=True,
        )


def mode_checks(checker: Checker, compile_blocks: bool):
    """Three steps in each mode, from the same weights on the same batches: the losses must
    agree."""
    model = small_model(checker.cuda, checker.ranks)
    modes = [
        ("fp32", ["--dtype=float32"], 0),
        ("bf16", ["--dtype=bfloat16"], 0),
        ("activation checkpointing", ["--dtype=bfloat16", "--activation_checkpointing=true"], 0),
    ]
    if checker.ranks >= 2:
        modes.append((f"ddp on {checker.ranks} ranks", ["--dtype=bfloat16"], checker.ranks))
    modes.append(
        (f"fsdp on {checker.ranks} rank(s)", ["--dtype=bfloat16", "--parallel=fsdp"], checker.ranks)
    )
    if compile_blocks:
        modes.append(("regional torch.compile", ["--dtype=bfloat16", "--compile=true"], 0))
    reference = None
    for name, overrides, nproc in modes:
        with checker.check(f"mode: {name}") as figures:
            log = checker.train(name.split()[0], [*model, "--max_steps=3", *overrides], nproc)
            losses = [r["loss"] for r in log if "loss" in r]
            figures.update(
                dtype=next(r["dtype"] for r in log if r.get("event") == "start"),
                losses=losses,
                last_loss=losses[-1],
                tokens_per_s=[r for r in log if "loss" in r][-1]["tokens_per_s"],
            )
            reference = reference or losses
            tolerance = FP32_TOLERANCE if figures["dtype"] == "float32" else BF16_TOLERANCE
            if max(abs(a - b) for a, b in zip(losses, reference)) > tolerance:
                raise RuntimeError(
                    f"losses {losses} differ from fp32's {reference} by more than {tolerance}: this"
                    " mode computes something else from the same weights and batches"
                )
            if not losses[-1] < losses[0]:
                raise RuntimeError(f"the loss did not fall: {losses}")


def wide_check(checker: Checker, layers: int, steps: int):
    """The 7B width with `layers` blocks: speed, memory against the estimate, checkpoint write."""
    overrides = wide_model(checker.cuda, layers, checker.ranks) + [f"--max_steps={steps}"]
    name = (
        f"7B width, {layers} layers" if checker.cuda else f"7B recipe at dim 128, {layers} layers"
    )
    with checker.check(name) as figures:
        log = checker.train("wide", overrides, checker.ranks, data="data-wide")
        # steady state: past allocation and warm-up
        records = [r for r in log if "tokens_per_s" in r][steps // 2 :]
        saved = next(r for r in log if r.get("event") == "checkpoint")
        folder = checker.work / "wide" / saved["path"]
        # DCP: a folder
        files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else [folder]
        size = sum(f.stat().st_size for f in files)
        estimate = estimate_memory(
            load_config(str(ROOT / "config" / "7b.py"), overrides[1:]),
            checker.ranks,
        )
        figures.update(
            params=next(r["params"] for r in log if r.get("event") == "start"),
            tokens_per_s=round(statistics.median(r["tokens_per_s"] for r in records)),
            tflops_per_s=round(statistics.median(r["flops_per_s"] for r in records) / 1e12, 2),
            estimated_gib=round(estimate["total"] / 2**30, 2),
            checkpoint_gb=round(size / 1e9, 2),
            checkpoint_s=saved["seconds"],
            checkpoint_gb_per_s=round(size / 1e9 / max(saved["seconds"], 1e-3), 2),
        )
        if checker.cuda:
            figures["mfu"] = (
                round(statistics.median(r["mfu"] for r in records), 3)
                if "mfu" in records[0]
                else None
            )
            figures["peak_gib"] = round(max(r["peak_mem_gib"] for r in records), 2)
            figures["peak_over_estimate"] = round(figures["peak_gib"] / figures["estimated_gib"], 2)


def sampling_checks(checker: Checker, trained: Path, layers: int):
    """sample.py from a checkpoint of the bf16 mode, then decoding speed with the KV cache at the
    7B width."""
    with checker.check("sample.py from a checkpoint") as figures:
        command = [
            sys.executable,
            "sample.py",
            "--ckpt",
            str(trained),
            "--prompt",
            "ROMEO:",
            "--max-new-tokens=32",
            "--seed=1",
            "--device",
            "cuda" if checker.cuda else "cpu",
        ]
        result = subprocess.run(command, cwd=ROOT, env=checker.env, capture_output=True, text=True)
        if result.returncode or not result.stdout.strip():
            raise RuntimeError(f"exit status {result.returncode}: {result.stderr[-2000:]}")
        figures["characters"] = len(result.stdout)
    with checker.check(
        "KV-cache decoding at the 7B width" if checker.cuda else "KV-cache decoding"
    ) as figures:
        config = load_config(
            str(ROOT / "config" / "7b.py"), wide_model(checker.cuda, layers, 1)[1:]
        ).model
        device = torch.device("cuda" if checker.cuda else "cpu")
        with torch.device("meta"):
            model = Transformer(config)
        model.to_empty(device=device)
        torch.manual_seed(0)
        model.init_weights()  # speed does not depend on the values
        model = model.to(torch.bfloat16 if checker.cuda else torch.float32).eval()
        prompt, new_tokens = list(range(16)), 128 if checker.cuda else 32
        generate(model, prompt, 8, temperature=0)  # warm-up: allocations and kernel choices
        if checker.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0)[0]
        if checker.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if len(out) != new_tokens:
            raise RuntimeError(f"{len(out)} tokens decoded instead of {new_tokens}")
        figures.update(
            tokens_per_s=round(new_tokens / seconds, 1),
            ms_per_token=round(1e3 * seconds / new_tokens, 2),
        )


def write_json(path: Path, report: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the 7B-width model")
    parser.add_argument(
        "--steps", type=int, default=10, help="training steps of the 7B-width model"
    )
    parser.add_argument("--compile", action="store_true", help="also check regional torch.compile")
    parser.add_argument(
        "--work-dir", default=str(ROOT / "out"), help="where the runs and checkpoints go (deleted)"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    ranks = torch.cuda.device_count() if cuda else 2
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(
        f"{device}, {ranks} {'GPU(s)' if cuda else 'gloo ranks'}, torch {torch.__version__}"
        + (
            ""
            if cuda
            else ": no CUDA, so the checks run at a small width; these are not GPU figures"
        ),
        flush=True,
    )
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_", dir=args.work_dir) as work:
        checker = Checker(Path(work), cuda, ranks)
        mode_checks(checker, args.compile)
        wide_check(checker, args.layers, args.steps)
        sampling_checks(checker, checker.work / "bf16", args.layers)
    ok = all(r["ok"] for r in checker.results)
    report = {
        "device": device,
        "cuda": cuda,
        "ranks": ranks,
        "torch": torch.__version__,
        "gpu_figures": cuda,
        "note": "" if cuda else "CPU run at a small width: these are not GPU figures",
        "ok": ok,
        "seconds": round(time.time() - start, 1),
        "checks": checker.results,
    }
    write_json(Path(args.out), report)
    print(
        f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {report['seconds']:.0f} s; "
        f"report in {args.out}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
