"""Fixtures for training tests: a small BPE tokenizer that fits ``test-tiny``'s 512-token
vocabulary, and a small corpus of real text (a few standard-library modules)."""

import sysconfig
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from afmkit.data.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "glob.py", "fnmatch.py", "bisect.py"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        (directory / name.replace("/", "_")).write_text((STDLIB / name).read_text())
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([p.read_text() for p in sorted(corpus_dir.iterdir())], trainer)
    directory = tmp_path_factory.mktemp("tokenizer")
    Tokenizer(backend, eos_token="<|endoftext|>").save(directory)
    return directory
