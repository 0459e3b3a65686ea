"""Progress on stderr: plain log lines every N units off a terminal, a bar on one, nothing when quiet."""

import io

from afmkit.progress import ProgressReporter


def run(total, *, every=None, terminal=False, quiet=False, stop_at=None):
    stream = io.StringIO()
    with ProgressReporter(
        "work", total, unit="items", log_every=every, stream=stream, terminal=terminal, quiet=quiet
    ) as p:
        for i in range(stop_at or total):
            p.advance(1, tokens=10, loss=f"{1 / (i + 1):.2f}")
    return stream.getvalue().splitlines()


def test_off_a_terminal_a_line_every_n_units_and_one_at_the_end():
    lines = run(10, every=3)
    assert [line.split(",")[0] for line in lines] == [
        "work: 3/10 items (30%)",
        "work: 6/10 items (60%)",
        "work: 9/10 items (90%)",
        "work: 10/10 items (100%)",
    ]
    assert lines[0].split(", ")[1] == "loss 0.33" and "tok/s" in lines[0] and ", ETA " in lines[0]
    assert "done in" in lines[-1]
    assert len(run(40)) == 20  # default: every 5%


def test_no_duplicate_final_line_and_nothing_when_quiet_or_on_a_terminal():
    assert len(run(9, every=3)) == 3  # the 9th unit's line is the final one
    assert run(10, quiet=True) == []
    assert not any(line.startswith("work: ") for line in run(10, terminal=True))  # a bar, not log lines
