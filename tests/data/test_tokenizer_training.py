import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afmkit.cli import main
from afmkit.data.tokenizer import Tokenizer
from afmkit.data.tokenizer_training import CHAT_SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from afmkit.errors import UserError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In 2024 the price rose from 12345 to 67890 dollars, a 450% increase.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
    "Über naïve café — 東京 is 日本's capital. Ελληνικά και русский текст.",
    "Emoji 🎉🚀 and tabs\tand\nnewlines\n\n  indented  text  ",
] * 20


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    tokenizer, _ = train_tokenizer(CORPUS, vocab_size=400, show_progress=False)
    return tokenizer


def test_vocab_size_is_as_asked(trained):
    assert trained.vocab_size == 400
    # All 256 byte symbols are in the base vocabulary, so nothing is unknown.
    assert trained.backend.get_vocab_size() >= 256 + len(CHAT_SPECIAL_TOKENS)


def test_every_digit_is_its_own_token(trained):
    # The corpus repeats 12345 and 67890 twenty times: plain BPE would merge them; AFM's rule forbids it.
    for number in ("12345", "67890", "2024", "3.14159"):
        pieces = [trained.decode([i]) for i in trained.encode(number)]
        digits = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digits), pieces
    assert len(trained.encode("12345")) == 5


def test_special_tokens_are_single_ids(trained):
    for expected_id, token in enumerate(CHAT_SPECIAL_TOKENS):
        assert trained.encode(token) == [trained.token_id(token)] == [expected_id]
    assert trained.eos_token == "<|endoftext|>"
    assert set(trained.stop_tokens) == {"<|endoftext|>", "<|im_end|>"}


def test_chat_template(trained):
    prompt = trained.apply_chat_template([{"role": "user", "content": "Add 2 and 40."}])
    assert prompt == "<|im_start|>user\nAdd 2 and 40.<|im_end|>\n<|im_start|>assistant\n"
    ids = trained.encode(prompt)
    assert ids[0] == trained.token_id("<|im_start|>") and trained.token_id("<|im_end|>") in ids
    assert trained.decode(ids, skip_special_tokens=False) == prompt


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_of_any_unicode(trained, text):
    # Byte level and no normaliser: every string, even one never seen in training, comes back exactly.
    assert trained.decode(trained.encode(text)) == text


def test_reload_equals_original(trained, tmp_path):
    save_tokenizer(trained, tmp_path / "tok")
    loaded = Tokenizer.from_directory(tmp_path / "tok")
    sample = "".join(CORPUS[:5]) + " <|im_start|>x<|im_end|> 987"
    assert loaded.encode(sample) == trained.encode(sample)
    assert loaded.vocab_size == trained.vocab_size
    assert loaded.chat_template == trained.chat_template and loaded.eos_token == trained.eos_token
    assert loaded.stop_ids == trained.stop_ids


def test_bad_parameters(tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100, show_progress=False)
    with pytest.raises(UserError, match="corpus is empty"):
        train_tokenizer([], vocab_size=300, show_progress=False)


def test_cli_trains_saves_and_refuses_to_overwrite(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out), "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["vocab_size"] == 300 and record["documents"] == len(CORPUS)
    before = (out / "tokenizer.json").read_bytes()

    # A second run to the same directory is refused, leaving the first tokenizer intact ...
    again = ["tokenizer", "train", "--data", str(data), "--vocab-size", "320", "--out", str(out)]
    assert main(again) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == before
    # ... unless --force.
    assert main([*again, "--force"]) == 0
    assert Tokenizer.from_directory(out).vocab_size == 320

    # A missing data path: a clear error, nothing written.
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(tmp_path / "nope"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "t2"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()


def test_cli_warns_when_the_corpus_is_too_small_for_the_vocabulary(tmp_path, capsys):
    data = tmp_path / "small.txt"
    data.write_text(CORPUS[0])
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "5000", "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert "warning: the corpus supports only" in err and "asked for 5,000" in err
    assert Tokenizer.from_directory(tmp_path / "t").vocab_size < 5000


def test_hugging_face_transformers_reads_the_saved_tokenizer(trained, tmp_path):
    # An independent reader of the files: transformers' AutoTokenizer gives the same ids and chat prompt.
    transformers = pytest.importorskip("transformers")
    save_tokenizer(trained, tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    sample = "Numbers 12345, café 東京 🎉 <|im_start|>user\nhi<|im_end|>"
    assert hf.encode(sample, add_special_tokens=False) == trained.encode(sample)
    messages = [{"role": "user", "content": "Add 2 and 40."}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        trained.apply_chat_template(messages)
    )
    assert hf.eos_token == "<|endoftext|>"


def test_cli_bad_corpus_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello world"}) + "\n{oops\n")
    (tmp_path / "blank.txt").write_text(" \n")
    for data, message in ((bad, "bad.jsonl:2: not valid JSON"), (tmp_path / "blank.txt", "corpus is empty")):
        assert (
            main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 2
        )
        assert message in capsys.readouterr().err
        assert not (tmp_path / "t").exists()
