"""The production features around the core: run folders and checkpoints, distributed setup, logs,
memory estimate and trace, Hugging Face interop, other tokenizers' formats, the bounded-memory
tokenizer trainer and the fast encoder, corpus reading and resumable data preparation.

The core (tokenizer.py, model.py, config/, data.py) never imports from here; this package imports
the core; the entry points compose both: train.py, sample.py, and the command lines of data.py
and tokenizer.py, which live here (infra/prepare.py, infra/tokenizer_cli.py).
"""
