"""Sliding-window perplexity: the Hugging Face recipe, batch-size independent, and equal to
transformers' perplexity on the same weights and windows."""

import json
import math

import numpy as np
import pytest

from afmkit.errors import UserError
from afmkit.eval.perplexity import perplexity_of_text, perplexity_of_tokens, read_text, sliding_windows
from afmkit.files import packaged_data, shared_data_dir

# Fast tests read the public-domain slice that ships with afmkit; the slow comparison with
# transformers uses 100,000 characters of the full file (CI-only data, as in docs/evaluation.md).
SHAKESPEARE = packaged_data("tinyshakespeare/input_head.txt")
FULL_SHAKESPEARE = shared_data_dir() / "pretrain" / "tinyshakespeare_input.txt"


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(10, 4, 2), (1000, 128, 64), (100, 256, 100), (37, 8, 3)])
def test_every_token_after_the_first_is_scored_exactly_once(n, seq_len, stride):
    windows = sliding_windows(n, seq_len=seq_len, stride=stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    assert all(w.end - w.begin <= seq_len and w.begin <= w.score_from - 1 for w in windows)
    assert windows[-1].end == n
    # After the first window, each scored token has at least seq_len - stride tokens of context.
    assert all(w.score_from - w.begin >= min(seq_len - stride, w.score_from) for w in windows[1:])


def test_without_overlap_each_windows_first_token_goes_unscored_as_in_the_hf_recipe():
    windows = sliding_windows(1000, seq_len=128, stride=128)
    scored = {t for w in windows for t in range(w.score_from, w.end)}
    assert sorted(set(range(1000)) - scored) == list(range(0, 1000, 128))


def test_bad_window_settings_are_user_errors():
    with pytest.raises(UserError, match="--stride"):
        sliding_windows(100, seq_len=16, stride=32)
    with pytest.raises(UserError, match="--seq-len"):
        sliding_windows(100, seq_len=1, stride=1)
    with pytest.raises(UserError, match="at least 2"):
        sliding_windows(1, seq_len=16, stride=8)


def test_same_perplexity_for_any_batch_size(smollm2):
    text = read_text(SHAKESPEARE, max_chars=2500)
    results = [perplexity_of_text(smollm2, text, seq_len=128, stride=48, batch_size=b) for b in (1, 5)]
    assert results[0].windows > 5 and results[0].tokens == results[0].text_tokens - 1
    # Each window is computed alone and NLLs are summed in float64 in window order: the
    # perplexities are equal, not just close.
    assert results[1].tokens == results[0].tokens
    assert results[1].perplexity == results[0].perplexity


def test_one_window_equals_the_plain_mean_negative_log_likelihood(tiny_model):
    ids = tiny_model.tokenizer.encode(read_text(SHAKESPEARE, max_chars=400))
    logits = tiny_model.logits(ids).astype(np.float64)
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]]
    result = perplexity_of_tokens(tiny_model, ids, seq_len=len(ids), stride=len(ids))
    assert result.windows == 1
    assert result.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-5)


def test_cli_json_last_line_and_bad_input(tmp_path, capsys, smollm2):
    from afmkit.cli import main

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 10)
    assert main(["eval", "perplexity", "--text", str(text), "--seq-len", "64", "--stride", "32", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["perplexity"] > 1 and record["tokens"] > 50
    assert main(["eval", "perplexity", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--text", str(text), "--seq-len", "64", "--stride", "65"]) == 2
    assert "--stride" in capsys.readouterr().err


def test_cli_json_shows_progress_lines_on_stderr_when_it_is_not_a_terminal(tmp_path, capsys, smollm2):
    """With --json (and stderr a pipe, as under pytest) a plain line every 5% of the windows:
    windows done/total, the running perplexity, tokens/s and the ETA; stdout stays the JSON."""
    import re

    from afmkit.cli import main

    args = ["eval", "perplexity", "--text", str(SHAKESPEARE), "--max-chars", "3000"]
    assert main([*args, "--seq-len", "64", "--stride", "32", "--batch-size", "2", "--json"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip().splitlines()[-1])
    lines = [line for line in captured.err.splitlines() if line.startswith("perplexity: ")]
    total = record["windows"]
    assert total >= 20 and len(lines) >= 10  # every max(1, total // 20) windows
    pattern = rf"perplexity: (\d+)/{total} windows \(\d+%\), ppl ([\d.]+), [\d,]+ tok/s, (ETA \d+m\d\ds|done in .*)"
    parsed = [re.fullmatch(pattern, line) for line in lines]
    assert all(parsed), lines
    done = [int(m.group(1)) for m in parsed]
    assert done == sorted(done) and done[-1] == total and "done in" in lines[-1]
    # The last running perplexity is the result.
    assert float(parsed[-1].group(2)) == pytest.approx(record["perplexity"], abs=1e-3)


def hf_sliding_window_perplexity(model, input_ids, *, seq_len, stride):
    """transformers' documented recipe ("Perplexity of fixed-length models"), with the NLL of
    each window weighted by the number of tokens it actually scores."""
    import torch

    nll_sum, n_scored, prev_end = 0.0, 0, 0
    total = input_ids.size(1)
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        target_len = end - prev_end
        window = input_ids[:, begin:end]
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())  # labels are shifted inside the model
        nll_sum += float(loss) * scored
        n_scored += scored
        prev_end = end
        if end == total:
            break
    return math.exp(nll_sum / n_scored), n_scored


@pytest.mark.slow
@pytest.mark.skipif(not FULL_SHAKESPEARE.is_file(), reason=f"the full tinyshakespeare is not at {FULL_SHAKESPEARE}")
def test_smollm2_perplexity_on_tinyshakespeare_matches_transformers(smollm2, smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = read_text(FULL_SHAKESPEARE, max_chars=100_000)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    hf_ids = tokenizer(text, return_tensors="pt").input_ids
    ours_ids = smollm2.tokenizer.encode(text)
    assert hf_ids[0].tolist() == ours_ids  # same tokens: neither side adds a BOS token
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    theirs, theirs_tokens = hf_sliding_window_perplexity(model.eval(), hf_ids, seq_len=1024, stride=512)
    ours = perplexity_of_text(smollm2, text, seq_len=1024, stride=512, batch_size=4)
    print(json.dumps({"afmkit": ours.to_dict(), "transformers": {"perplexity": theirs, "tokens": theirs_tokens}}))
    assert ours.tokens == theirs_tokens
    assert ours.perplexity == pytest.approx(theirs, rel=0.005)


def test_cli_adapter_scores_base_plus_adapter(tiny_model, tmp_path, capsys):
    import jax

    from afmkit.adapters.lora import LoraConfig, random_adapter
    from afmkit.adapters.peft_io import save_adapter
    from afmkit.cli import main

    model_dir = tiny_model.save(tmp_path / "model")
    adapter = random_adapter(tiny_model.config, LoraConfig(rank=4), jax.random.PRNGKey(1), b_std=0.05)
    adapter_dir = save_adapter(tmp_path / "ad", adapter, config=tiny_model.config, params=tiny_model.params)
    text = tmp_path / "t.txt"
    text.write_text(packaged_data("tinyshakespeare/input_head.txt").read_text()[:1500])
    flags = ["eval", "perplexity", "--model", str(model_dir), "--text", str(text), "--seq-len", "64", "--stride", "32"]
    assert main([*flags, "--adapter", str(adapter_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    want = perplexity_of_text(tiny_model.with_adapter(adapter), text.read_text(), seq_len=64, stride=32, quiet=True)
    bare = perplexity_of_text(tiny_model, text.read_text(), seq_len=64, stride=32, quiet=True)
    assert got == pytest.approx(want.perplexity, rel=1e-6) and got != pytest.approx(bare.perplexity, rel=1e-3)
    assert main([*flags, "--adapter", str(tmp_path)]) == 2  # not an adapter directory: one line
    assert "not an adapter directory" in capsys.readouterr().err
