"""DDP and FSDP2 under `torchrun --nproc_per_node=2` (gloo, CPU) against a single process.

Tolerance: with the same global batch, ranks compute the same per-sequence gradients as one
process; only the order of fp32 additions (all-reduce, reduce-scatter, the mean over micro-steps)
differs, by a few ulp. Losses must agree to 1e-4 (they are logged to 4 decimals). AdamW divides
each update by sqrt(v): for the rare weights whose gradient is ~0, that rounding noise can move
the update by up to lr (3e-3) per step, so parameters must agree to 1e-6 in 99.9% of elements
and to 1e-4 (3% of one step) in all; a wrong gradient scale or data split moves them by ~lr
everywhere and fails both.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infra import checkpoint, hf
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent
ENTRY = str(ROOT / "tests" / "run_train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed unavailable"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    return root


def args(workdir, out, *extra):
    return [
        f"--inputs={workdir / 'corpus.txt'}",
        f"--data_dir={workdir / 'prepared'}",
        f"--out_dir={workdir / out}",
        "--device=cpu",
        "--dtype=float32",
        "--model.vocab_size=384",
        "--model.dim=64",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.ffn_hidden=128",
        "--model.max_seq_len=64",
        "--model.dropout=0.0",
        "--micro_batch_size=8",
        "--global_batch_tokens=1024",
        "--optimizer=adamw",  # the mechanics under test; Muon has its own tests
        "--lr=3e-3",
        "--warmup_steps=2",
        "--eval_interval=3",
        "--eval_tokens=2048",
        "--log_interval=1",
        "--sample_tokens=0",
        "--max_steps=6",
        *extra,
    ]


def torchrun(nproc):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]


def launch(arguments, nproc=0, env=ENV):
    """tests/run_train.py with `arguments` on `nproc` torchrun ranks (0: plain python); it must
    succeed."""
    result = subprocess.run(
        [*(torchrun(nproc) if nproc else [sys.executable]), ENTRY, *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def run(workdir, out, *extra, nproc=0, stop_at=0, **conditions):
    """Train with `nproc` torchrun ranks (0: plain python) and return the output folder;
    `conditions` are the environment settings of tests/run_train.py (SLOW_PREPARE_S=..., ...)."""
    env = {**ENV, "STOP_AT_STEP": str(stop_at), **{k: str(v) for k, v in conditions.items()}}
    launch(args(workdir, out, *extra), nproc, env)
    return workdir / out


@pytest.fixture(scope="module")
def single(workdir):
    return run(workdir, "single")


def losses(out):
    return [
        r["loss"]
        for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def model_state(out):
    return checkpoint.safe_load(checkpoint.latest(out, sharded=False))["model"]


def assert_same_model(a, b):
    state_a, state_b = model_state(a), model_state(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        difference = (state_a[name] - state_b[name]).abs()
        assert difference.max() <= 1e-4, f"{name}: max difference {difference.max():.2e}"
        # fp32 sums in another order: a few elements off by rounding (one, in a small tensor)
        differing = int((difference > 1e-6).sum())
        assert differing <= max(1, 1e-3 * difference.numel()), f"{name}: {differing} differ"


def consolidate(out):
    """train.py --consolidate: the FSDP run's newest ckpt-N/ into ckpt-N.pt."""
    subprocess.run(
        [sys.executable, "train.py", "--consolidate", str(out)],
        cwd=ROOT,
        check=True,
        env=ENV,
        capture_output=True,
    )


def test_ddp_two_ranks_equal_one_process(workdir, single):
    ddp = run(workdir, "ddp", nproc=2)
    assert len(losses(ddp)) == 6
    assert losses(ddp) == pytest.approx(losses(single), abs=1e-4)
    assert_same_model(ddp, single)
    log = (ddp / "log.jsonl").read_text()
    assert '"world_size": 2' in log and '"grad_accum": 1' in log


def test_ddp_gradient_accumulation_equals_one_large_batch(workdir):
    one_batch = run(workdir, "one_batch", "--micro_batch_size=16")
    accumulated = run(workdir, "ddp_accum", "--micro_batch_size=4", nproc=2)
    assert '"grad_accum": 2' in (accumulated / "log.jsonl").read_text()
    assert losses(accumulated) == pytest.approx(losses(one_batch), abs=1e-4)
    assert_same_model(accumulated, one_batch)


def test_fsdp_two_ranks_equal_one_process_and_consolidate(workdir, single):
    """With activation checkpointing on: recomputing each block in backward must change nothing. Run
    as on a GPU machine with --device=cpu: FSDP must shard on the run's device, not on the
    accelerator."""
    fsdp = run(
        workdir,
        "fsdp",
        "--parallel=fsdp",
        "--activation_checkpointing=true",
        nproc=2,
        FAKE_ACCELERATOR="cuda",
    )
    assert (fsdp / "ckpt-000006" / ".metadata").is_file() and checkpoint.latest(
        fsdp, sharded=False
    ) is None
    assert losses(fsdp) == pytest.approx(losses(single), abs=1e-4)
    consolidate(fsdp)
    assert_same_model(fsdp, single)
    assert checkpoint.safe_load(fsdp / "ckpt-000006.pt")["config"]["parallel"] == "fsdp"


@pytest.fixture(scope="module")
def chat_bases(workdir):
    """Base models to fine-tune, each 3 steps: one trained in one process (ckpt-N.pt), one by
    FSDP on 2 ranks (ckpt-N/); and conversations for them (greetings, one or two turns)."""
    with open(workdir / "chats.jsonl", "w") as f:
        for i, name in enumerate("Ann Bob Cleo Dion Emil Fay Gus Hal Ida Jon".split() * 4):
            turns = [("Say hello to", "Hello, "), ("Greet", "Good day, ")][: 1 + i % 2]
            messages = []
            for ask, answer in turns:
                messages += [
                    {"role": "user", "content": f"{ask} {name}"},
                    {"role": "assistant", "content": f"{answer}{name}!"},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    file_base = run(workdir, "chat_base", "--max_steps=3")
    fsdp_base = run(workdir, "chat_base_fsdp", "--max_steps=3", "--parallel=fsdp", nproc=2)
    return {"file": file_base, "fsdp": fsdp_base}


def fine_tune(workdir, out, base, *extra, nproc=0):
    """config/sft.py from `base` on the conversations of chat_bases: 6 steps of 16."""
    launch(
        [
            str(ROOT / "config" / "sft.py"),
            f"--init_from={base}",
            f"--inputs={workdir / 'chats.jsonl'}",
            f"--data_dir={workdir / 'chat_data'}",
            f"--out_dir={workdir / out}",
            "--device=cpu",
            "--dtype=float32",
            "--model.dropout=0.0",
            "--micro_batch_size=4",
            "--global_batch_tokens=1024",
            "--lr=3e-3",
            "--warmup_steps=2",
            "--eval_interval=3",
            "--eval_tokens=1024",
            "--log_interval=1",
            "--max_steps=6",
            *extra,
        ],
        nproc,
    )
    return workdir / out


@pytest.mark.parametrize(
    "base, parallels", [("file", ["ddp", "fsdp"]), ("fsdp", ["fsdp"])], ids=["file", "fsdp"]
)
def test_chat_fine_tuning_on_two_ranks_equals_one_process(workdir, chat_bases, base, parallels):
    """A chat run grows the vocabulary by ChatML's two tokens and trains on the replies only;
    on 2 ranks it must follow one process, from a base saved as ckpt-N.pt or as an FSDP run's
    ckpt-N/. Each rank takes whole micro-batches of the one process, so each micro-batch's mean
    over its reply tokens is the same."""
    single = fine_tune(workdir, f"sft_{base}", chat_bases[base])
    assert model_state(single)["output.weight"].shape[0] == 384 + 2  # <|im_start|>, <|im_end|>
    for parallel in parallels:
        out = fine_tune(workdir, f"sft_{base}_{parallel}", chat_bases[base],
                        f"--parallel={parallel}", nproc=2)  # fmt: skip
        assert len(losses(out)) == 6
        assert losses(out) == pytest.approx(losses(single), abs=1e-4)
        if parallel == "fsdp":
            consolidate(out)
        assert_same_model(out, single)


def test_an_fsdp_run_folder_grows_its_vocabulary_as_a_checkpoint_file_does(chat_bases, tmp_path):
    """The two rows a chat run adds, read from a sharded ckpt-N/: each the mean of the base's
    rows, the rest the base's weights (those of the folder consolidated into ckpt-N.pt)."""
    base = chat_bases["fsdp"]
    state = checkpoint.read_train_state(checkpoint.latest(base, sharded=True))
    config = ModelConfig(**{**state["config"]["model"], "vocab_size": 386})
    grown = Transformer(config)
    hf.load_weights(grown, base, verbose=False, new_rows=True)
    shutil.copytree(base, tmp_path / "base")
    consolidate(tmp_path / "base")
    saved = model_state(tmp_path / "base")
    for name, param in grown.state_dict().items():
        if name in hf.VOCABULARY_TABLES:
            table = saved[name]
            torch.testing.assert_close(param[:384], table, rtol=0, atol=0)
            torch.testing.assert_close(param[384:], table.mean(0).expand(2, -1))
        else:
            torch.testing.assert_close(param, saved[name], rtol=0, atol=0)


def test_fsdp_resume_equals_uninterrupted_also_on_another_world_size(workdir, single):
    stopped = run(workdir, "fsdp_resume", "--parallel=fsdp", nproc=2, stop_at=3)
    assert checkpoint.read_train_state(checkpoint.latest(stopped, sharded=True))["step"] == 3
    # A stop before the first step of a resumed run: that step's checkpoint is already there, and
    # saving it again would have to replace a folder that exists.
    saved = (stopped / "ckpt-000003" / checkpoint.TRAIN_STATE_FILE).stat().st_mtime_ns
    run(workdir, "fsdp_resume", "--parallel=fsdp", "--resume", nproc=2, stop_at=3)
    assert (stopped / "ckpt-000003" / checkpoint.TRAIN_STATE_FILE).stat().st_mtime_ns == saved
    assert (
        not list(stopped.glob("*.tmp"))
        and (stopped / "log.jsonl").read_text().count('"signal"') == 2
    )
    shutil.copytree(stopped, workdir / "fsdp_resume_1rank")
    run(workdir, "fsdp_resume", "--parallel=fsdp", "--resume", nproc=2)
    run(workdir, "fsdp_resume_1rank", "--parallel=fsdp", "--resume", nproc=1)
    for out in ("fsdp_resume", "fsdp_resume_1rank"):
        consolidate(workdir / out)
        assert_same_model(workdir / out, single)
        assert losses(workdir / out) == pytest.approx(losses(single), abs=1e-4)


def test_muon_under_fsdp_equals_one_process_and_resumes(workdir):
    """Each rank orthogonalizes the whole gathered matrix and keeps its rows: the update of one
    process. Its momentum buffers go through the sharded checkpoint."""
    muon = ["--optimizer=muon", "--muon_lr=0.02"]
    single = run(workdir, "muon_single", *muon)
    fsdp = run(workdir, "muon_fsdp", *muon, "--parallel=fsdp", nproc=2, stop_at=3)
    assert checkpoint.read_train_state(checkpoint.latest(fsdp, sharded=True))["step"] == 3
    run(workdir, "muon_fsdp", *muon, "--parallel=fsdp", "--resume", nproc=2)
    assert losses(fsdp) == pytest.approx(losses(single), abs=1e-4)
    subprocess.run(
        [sys.executable, "train.py", "--consolidate", str(fsdp)],
        cwd=ROOT,
        check=True,
        env=ENV,
        capture_output=True,
    )
    assert_same_model(fsdp, single)


# torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers, and the signals its
# --signals-to-handle names: SLURM's `--signal=USR1@SECONDS` warning reaches them that way.
SIGNALS = {
    "SIGTERM": [],
    "SIGHUP": [],
    "SIGUSR1": ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"],
}


@pytest.mark.parametrize("name", SIGNALS)
def test_a_signal_to_torchrun_mid_step_saves_the_last_completed_step(workdir, single, name):
    """torchrun sends SIGKILL after its shutdown timeout (here 5 s). A step of 8 micro-steps of
    1.5 s takes 12 s, so waiting for the step's end would be killed: the ranks must agree to stop
    between micro-steps and save the last completed step."""
    out = workdir / f"signal_{name}"
    command = [
        *torchrun(2),
        "--shutdown-timeout=5",
        *SIGNALS[name],
        ENTRY,
        *args(workdir, out.name, "--micro_batch_size=1", "--max_steps=100", "--eval_interval=1000"),
    ]
    env = {**ENV, "SLOW_MICRO_STEP_S": "1.5"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in process.stdout:
        if line.startswith("step 1/"):
            time.sleep(3)  # well inside step 2
            process.send_signal(getattr(signal, name))
            break
    output = process.communicate(timeout=120)[0]
    assert "stopped by signal at step 1" in output, output[-3000:]
    state = checkpoint.read_train_state(checkpoint.latest(out, sharded=False))
    assert state["step"] == 1
    assert (
        checkpoint.safe_load(checkpoint.latest(out, sharded=False))["model"].keys()
        == model_state(single).keys()
    )


def test_rank0_prepares_while_the_others_wait_past_the_collective_timeout(workdir):
    """The ranks wait for rank 0's data preparation on a gloo group of their own: the default
    group's timeout (NCCL's is 10 minutes; 3 s here) must not end the job while a big corpus is
    prepared."""
    out = run(
        workdir,
        "slow_prepare",
        f"--data_dir={workdir / 'prepared_slowly'}",
        "--max_steps=1",
        nproc=2,
        SLOW_PREPARE_S=8,
        DIST_TIMEOUT_S=3,
    )
    assert [
        r["step"]
        for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
        if "loss" in r
    ] == [1]


def test_a_rank_that_cannot_see_rank0s_files_says_so(workdir):
    """Rank 1 in another folder stands for a node without the shared filesystem: relative folders
    then point elsewhere, and rank 1 must say what the run needs instead of failing on a missing
    file."""
    command = [
        *torchrun(2),
        ENTRY,
        *args(workdir, "unshared"),
        "--out_dir=unshared_out",
        "--data_dir=unshared_data",
    ]
    result = subprocess.run(
        command,
        cwd=workdir,
        env={**ENV, "CHDIR_RANK": f"1:{workdir / 'node1'}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert (
        "error: rank 1 on" in result.stderr
        and "cannot see the run folder rank 0 wrote" in result.stderr
        and "need out_dir and data_dir on a filesystem every node shares" in result.stderr
    ), result.stderr[-3000:]


def test_fsdp_blocks_rotate_in_fp32_as_ddp_does(tmp_path):
    """FSDP's bf16 policy must not round the fp32 RoPE tables the blocks receive (DDP's autocast
    rotates in fp32); the hidden state itself arrives in bf16."""
    script = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train
from config import TrainConfig
from model import ModelConfig
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
shape = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16)
cfg = TrainConfig(model=shape, device="cpu")
from infra.distributed import Runtime
rt = Runtime(0, 0, 1, torch.device("cpu"))
model = train.build_model(cfg, rt, torch.bfloat16, sharded=True, pretrained=False)
seen = []
hook = lambda module, args: seen.append([a.dtype for a in args[:3]])
model.layers[0].register_forward_pre_hook(hook)
model(torch.zeros(1, 16, dtype=torch.long))
print(seen[0])
dist.destroy_process_group()
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), str(tmp_path / "store")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == "[torch.bfloat16, torch.float32, torch.float32]", result.stderr[
        -2000:
    ]


def test_torchrun_with_the_default_config_and_a_config_error_reported_once(workdir, tmp_path):
    """The first commands a user tries: `torchrun --nproc_per_node=2 train.py` with the default
    config (the micro-batch adapts: 32 sequences of the 4096-token batch split over 2 ranks), run
    from another folder (the bundled corpus is found next to train.py), and a typo reported once,
    not once per rank."""
    command = [
        *torchrun(2),
        str(ROOT / "train.py"),
        "--device=cpu",
        "--max_steps=2",
        "--eval_tokens=1024",
        "--sample_tokens=0",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 micro-step(s) of 16x128 per step, 4,096 tokens per step" in result.stdout
    assert "micro_batch_size 16 (at most 32)" in result.stdout
    assert (tmp_path / "out" / "default" / "ckpt-000002.pt").is_file()
    typo = subprocess.run(
        [*torchrun(2), str(ROOT / "train.py"), "--max_step=2"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typo.returncode != 0
    assert typo.stderr.count("error: unknown config key 'max_step'; did you mean max_steps") == 1


def test_sharded_checkpoints_wait_on_the_host_group(tmp_path):
    """DCP's save and load run their collectives on the group they are given, the gloo host group
    (a slow shared filesystem must not trip NCCL's 10-minute watchdog); and the round trip is
    exact."""
    script = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import torch.distributed.checkpoint as dcp
import train
from config import TrainConfig
from infra import checkpoint
from infra.distributed import Runtime
from model import ModelConfig
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
host = dist.new_group(backend="gloo")
groups = []
for name in ("save", "load"):
    real = getattr(dcp, name)
    def spy(*args, real=real, **kwargs):
        groups.append(kwargs.get("process_group") is host)
        return real(*args, **kwargs)
    setattr(dcp, name, spy)
shape = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16)
cfg = TrainConfig(model=shape, device="cpu")
rt = Runtime(0, 0, 1, torch.device("cpu"), host)
model = train.build_model(cfg, rt, torch.float32, sharded=True, pretrained=False)
optimizer = train.make_optimizer(cfg, model, rt.device)
model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))[1].backward()
optimizer.step()
before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
path = checkpoint.save(sys.argv[3], 1, model, optimizer, {"step": 1}, True, 2, host)
with torch.no_grad():
    for p in model.parameters():
        p.zero_()
checkpoint.load(path, model, optimizer, group=host)
same = all(torch.equal(before[k], v.full_tensor()) for k, v in model.state_dict().items())
print(groups, same)
dist.destroy_process_group()
"""
    command = [sys.executable, "-c", script, str(ROOT), str(tmp_path / "store"), str(tmp_path)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1:] == ["[True, True] True"], result.stderr[-3000:]
