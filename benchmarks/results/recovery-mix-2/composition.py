"""How much of recovery-mix-2's text is tiny shakespeare, before and after data_start.txt
(run in the chain's folder: python composition.py SHARED_DATA_DIR). The text's Shakespeare chunks
(make_text.py: 4,000 characters each, in order) are found in it one after another."""

import sys
from pathlib import Path

sh = (Path(sys.argv[1]) / "pretrain" / "tinyshakespeare_input.txt").read_text()[600000:]
text = Path("recovery_mix_text.txt").read_text()
start = int(Path("data_start.txt").read_text())
pos = before = after = 0
for i in range(0, len(sh), 4000):
    chunk = sh[i : i + 4000]
    at = text.index(chunk, pos)
    pos = at + len(chunk)
    before += max(0, min(pos, start) - at)
    after += max(0, pos - max(at, start))
print(
    f"Shakespeare: {100 * before / start:.1f}% of the {start} characters read before, "
    f"{100 * after / (len(text) - start):.1f}% of the {len(text) - start} after; its last chunk ends at character {pos}"
)
