"""Entry point for the distributed tests: train.main, with the conditions a test sets in the
environment.

STOP_AT_STEP=N          behave as if SIGTERM arrived once N steps were done
SLOW_MICRO_STEP_S=S     every training forward takes S seconds longer (a big model's micro-step)
SLOW_PREPARE_S=S        preparing the data takes S seconds longer (a big corpus)
DIST_TIMEOUT_S=S        the default process group's collectives time out after S seconds
CHDIR_RANK=R:PATH       rank R runs in another folder (a node that does not share the filesystem)
FAKE_ACCELERATOR=cuda   torch reports a CUDA accelerator although the run is on CPU (a GPU machine)
LOSS_CHUNK_ELEMENTS=N   the loss is computed in chunks of N logits (to chunk a tiny model's loss)
STOP_BEFORE_MODEL=1     exit 0 once the data is ready and the batch planned, before the model
"""

import datetime
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train  # noqa: E402


def stop_at(step: int, set_attribute=setattr):
    """Make every run behave as if SIGTERM arrived once `step` steps were done, so that the
    checkpoint it leaves is of step `step` (pass monkeypatch.setattr to undo it)."""
    original = train.learning_rate

    def learning_rate(cfg, at_step):  # called once per step, before it
        if at_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(cfg, at_step)

    set_attribute(train, "learning_rate", learning_rate)


def slower(function, seconds: float, only_training=False):
    def slow(*args, **kwargs):
        if not only_training or args[0].training:
            time.sleep(seconds)
        return function(*args, **kwargs)

    return slow


if __name__ == "__main__":
    env = os.environ
    if int(env.get("STOP_AT_STEP", 0)):
        stop_at(int(env["STOP_AT_STEP"]))
    if "SLOW_MICRO_STEP_S" in env:
        train.Transformer.forward = slower(
            train.Transformer.forward, float(env["SLOW_MICRO_STEP_S"]), only_training=True
        )
    if "SLOW_PREPARE_S" in env:
        from infra import run

        run.prepare = slower(run.prepare, float(env["SLOW_PREPARE_S"]))
    if "DIST_TIMEOUT_S" in env:
        timeout = datetime.timedelta(seconds=float(env["DIST_TIMEOUT_S"]))
        init = dist.init_process_group
        dist.init_process_group = lambda *args, **kwargs: init(
            *args, **{**kwargs, "timeout": timeout}
        )
    if "CHDIR_RANK" in env:
        rank, path = env["CHDIR_RANK"].split(":", 1)
        if env["RANK"] == rank:
            os.makedirs(path, exist_ok=True)
            os.chdir(path)
    if env.get("FAKE_ACCELERATOR") == "cuda":
        torch._C._get_accelerator = lambda *args: torch.device("cuda")
    if "LOSS_CHUNK_ELEMENTS" in env:  # to run the chunked loss on tiny models
        import model

        model.LOSS_CHUNK_ELEMENTS = int(env["LOSS_CHUNK_ELEMENTS"])
    if env.get("STOP_BEFORE_MODEL") == "1":

        def stop(*args, **kwargs):
            print("stopped before building the model", flush=True)
            raise SystemExit(0)

        train.build_model = stop
    sys.exit(train.main(sys.argv[1:]))
