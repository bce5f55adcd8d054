"""Entry point for the distributed tests: train.main, stopped as if by SIGTERM at STOP_AT_STEP if set."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

stop_at = int(os.environ.get("STOP_AT_STEP", 0))
if stop_at:
    original = train.Trainer.train_step

    def train_step(self):
        result = original(self)
        if self.step + 1 == stop_at:
            self.stop_signal = signal.SIGTERM
        return result

    train.Trainer.train_step = train_step

sys.exit(train.main(sys.argv[1:]))
