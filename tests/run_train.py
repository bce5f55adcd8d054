"""Entry point for the distributed tests: train.main, stopped as if by SIGTERM at STOP_AT_STEP if set."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def stop_at(step: int, set_attribute=setattr):
    """Make every run behave as if SIGTERM arrived during `step` (pass monkeypatch.setattr to undo it)."""
    original = train.Trainer.train_step

    def train_step(self):
        if self.step + 1 == step:  # the step about to run is number `step`
            self.stop_signal = signal.SIGTERM
        return original(self)

    set_attribute(train.Trainer, "train_step", train_step)


if __name__ == "__main__":
    if "LOSS_CHUNK_ELEMENTS" in os.environ:  # to run the chunked loss on tiny models
        import model
        model.LOSS_CHUNK_ELEMENTS = int(os.environ["LOSS_CHUNK_ELEMENTS"])
    if int(os.environ.get("STOP_AT_STEP", 0)):
        stop_at(int(os.environ["STOP_AT_STEP"]))
    sys.exit(train.main(sys.argv[1:]))
