"""recovery-mix-3's text: what recovery-mix-2 read (the shipped recipe's text after the shipped run's
last token: hh-rlhf dialogues and the float teacher's chat answers) interleaved with tiny
shakespeare's prose that nothing else reads (characters 20,000-300,000 and 320,000-600,000: the
perplexity table reads the first 20,000, the RL runs' shakespeare_dev.txt 300,000-320,000, the
recipe from 600,000). 140 pieces of 4,000 prose characters, each followed by one of 140 pieces of
the dialogue text cut at line ends, so prose is about a quarter of the characters, as in the part
of the recipe's text the shipped run read (26.4%, ../recovery-mix-2/composition.txt).
Writes recovery_mix3_text.txt and steps.txt (one pass over it: rows of 256 tokens less the 8 held
out, 4 rows a step).

    python make_text.py SHARED_DATA_DIR RECOVERY_MIX_2_TEXT RECOVERY_MIX_2_DATA_START
"""

import sys
from pathlib import Path

import afmkit

shared, mix2_text, mix2_start = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sh = (shared / "pretrain" / "tinyshakespeare_input.txt").read_text()
prose = sh[20000:300000] + sh[320000:600000]
prose_pieces = [prose[i : i + 4000] for i in range(0, len(prose), 4000)]
dialogue = mix2_text.read_text()[int(mix2_start.read_text()) :]
pieces, begin = [], 0
for n in range(len(prose_pieces), 0, -1):  # the rest cut into n nearly equal pieces at line ends
    end = len(dialogue) if n == 1 else dialogue.find("\n", begin + (len(dialogue) - begin) // n) + 1
    pieces.append(dialogue[begin:end])
    begin = end
text = "".join(p + "\n\n" + d for p, d in zip(prose_pieces, pieces))
Path("recovery_mix3_text.txt").write_text(text)
tokens = len(afmkit.load("smollm2-135m-instruct").tokenizer.encode(text))
steps = (tokens // 256 - 8) // 4
Path("steps.txt").write_text(f"{steps}\n")
share = sum(map(len, prose_pieces)) / len(text)
print(f"{len(text)} characters ({100 * share:.1f}% prose), {tokens} tokens, {steps} steps of 4 x 256")
