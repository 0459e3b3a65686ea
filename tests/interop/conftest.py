"""A finished pre-training run of ``test-tiny`` (4 steps, checkpoints at 2 and 4), trained through
the ``afmkit pretrain`` command with a small BPE tokenizer fitted to its 512-token vocabulary."""

import sysconfig
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from afmkit.cli import main
from afmkit.data.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "glob.py", "fnmatch.py"):
        (corpus / name).write_text((STDLIB / name).read_text())
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainer)
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    Tokenizer(backend, eos_token="<|endoftext|>").save(tokenizer)
    out = root / "run"
    status = main(
        [
            "pretrain",
            "--model=test-tiny",
            f"--tokenizer={tokenizer}",
            f"--data={corpus}",
            "--steps=4",
            "--save-every=2",
            "--batch=8",
            "--seq-len=32",
            "--warmup=1",
            "--quiet",
            f"--out={out}",
        ]
    )
    assert status == 0
    return out
