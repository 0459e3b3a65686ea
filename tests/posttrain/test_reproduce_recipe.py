"""``examples/smollm2_135m_afm/reproduce.sh``: the shipped model's recipe, every step at a tiny size.

The full recipe takes hours; ``SMOKE=1`` runs each of its commands with the same flags and file
hand-offs at sizes that take minutes, so a renamed flag, a moved output or a helper script that
no longer reads what the step before wrote fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afmkit.files import shared_data_dir

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "smollm2_135m_afm" / "reproduce.sh"
STEPS = [
    "prompts", "prompts_r3", "prompts_20k", "itec", "edit_data", "pairs2", "dpo2", "pairs4", "dpo4",
    "loop_cut", "continue_loops", "pairs5", "dpo5", "prompts_lf", "edit_lf", "pairs8", "lf_rest",
    "loop_cut_lf", "pairs9", "anchor", "dpo10", "prompts_rl", "rl", "rl3", "prompts_rl5", "rl5",
    "prompts_rl7", "rl7", "ifeval_shipped",
]  # fmt: skip


def run_script(out: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)  # the `afmkit` and `python` of this environment
    env = {**os.environ, "SMOKE": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=3600, check=False
    )


@pytest.mark.slow  # the real model through every step: about 20 minutes on 2 cores
@pytest.mark.skipif(not (shared_data_dir() / "sft").is_dir(), reason="needs ../shared/data")
def test_the_recipe_runs_end_to_end_and_a_rerun_skips_finished_steps(tmp_path):
    out = tmp_path / "afm"
    first = run_script(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for step in STEPS:
        assert (out / f".done-{step}").is_file(), step
    adapters = (
        "itec3/round-01/adapter",
        "dpo-2",
        "dpo-4",
        "dpo-5",
        "dpo-10",
        "rl-mdloo-2/adapter",
        "rl-mdloo-5/adapter",
        "rl-mdloo-7/adapter",
    )
    for adapter in adapters:
        config = json.loads((out / adapter / "adapter_config.json").read_text())
        assert config["r"] == 16, adapter
    runs = (("dpo-2", "itec3/round-01/adapter"), ("dpo-4", "dpo-2"), ("dpo-5", "dpo-4"), ("dpo-10", "dpo-5"))
    for run, start in runs:
        training = json.loads((out / run / "training.json").read_text())
        assert (training["steps_done"], training["settings"]["init_adapter"]) == (2, start), run
    # dpo-10 trains with the plain-text anchor; MDLOO from it (rl-mdloo-2), continued to twice its
    # iterations (rl-mdloo-3), then MDLOO from that on writing prompts (rl-mdloo-5) and from that on
    # writing prompts half in another language or capitals (rl-mdloo-7, shipped); no RL prompt file
    # holds a dev split's question in its train split
    dpo10 = json.loads((out / "dpo-10" / "training.json").read_text())
    assert dpo10["anchor_windows"] > 0 and dpo10["settings"]["anchor_weight"] == 10
    starts = (
        ("rl-mdloo-2", "dpo-10"),
        ("rl-mdloo-3", "dpo-10"),
        ("rl-mdloo-5", "rl-mdloo-3/adapter"),
        ("rl-mdloo-7", "rl-mdloo-5/adapter"),
    )
    for run, start in starts:
        rl = json.loads((out / run / "rl.json").read_text())["settings"]
        assert (rl["algo"], rl["init_adapter"], rl["unfinished_reward"]) == ("mdloo", start, 0.0), run
    iterations = {
        run: len((out / run / "metrics.jsonl").read_text().splitlines()) for run in ("rl-mdloo-2", "rl-mdloo-3")
    }
    assert iterations["rl-mdloo-3"] > iterations["rl-mdloo-2"] >= 2  # the continuation adds iterations to the same log
    held = {
        json.loads(line)["task_source"]
        for line in (SCRIPT.parents[2] / "benchmarks/results/longform-dev/longform_dev.jsonl").read_text().splitlines()
    }
    for prompts in ("prompts_rl.jsonl", "prompts_rl5.jsonl", "prompts_rl7.jsonl"):
        train = [json.loads(line) for line in (out / prompts).read_text().splitlines()]
        assert not held & {row["task_source"] for row in train if row["split"] == "train"}, prompts
    writing = [json.loads(line)["id"] for line in (out / "prompts_rl5.jsonl").read_text().splitlines()]
    assert all("-writing-" in key for key in writing)
    focus = {"language:response_language", "change_case:english_capital"}
    rl7 = [json.loads(line) for line in (out / "prompts_rl7.jsonl").read_text().splitlines()]
    rl7_train = [bool(focus & set(row["instruction_id_list"])) for row in rl7 if row["split"] == "train"]
    assert rl7_train and all(rl7_train[0::2]) and not any(rl7_train[1::2])  # alternating, focus first
    assert len((out / "ifeval-smollm2-135m-afm" / "per_prompt.jsonl").read_text().splitlines()) == 8

    second = run_script(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before, skipped") == len(STEPS)
