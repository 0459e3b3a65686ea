"""``CompressSettings``: every default of ``afmkit compress palettize`` and of the functions it
calls (sensitivity analysis, allocation), in one place."""

from __future__ import annotations

import dataclasses

SENSITIVITY_KINDS = ("proxy", "measured")
CODE_ASSIGNMENTS = ("nearest", "gptq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressSettings:
    bits_per_weight: float | None = None  # the budget; exactly one of it and ``recipe``
    recipe: str | None = None  # a recipe JSON fixing every matrix's bits (Talaria writes them)
    calibration: str | None = None  # a UTF-8 text file, never the evaluation text
    out: str | None = None  # the compressed model's directory
    calibration_start: int = 0  # first character of the calibration file used
    calibration_tokens: int = 8192  # tokens of calibration text for the Fisher information
    seq_len: int = 512  # tokens per calibration window
    measure_tokens: int = 1024  # tokens per KL measurement (--sensitivity measured)
    sensitivity: str = "proxy"  # "proxy": 1/2 sum F (w - q)^2; "measured": KL per matrix and width
    group_rows: int = 16  # output rows sharing one look-up table
    per_row_scale: bool = True  # one fp16 scale per output row, before clustering
    embed_bits: int = 8  # the embedding's integer bits (8 or 4)
    # how weights pick their table entry: "gptq" (error feedback through the calibration inputs'
    # Gram matrix, afmkit.compress.gptq; about half the perplexity loss of "nearest" at 3.5 bits)
    # or their "nearest" value
    codes: str = "gptq"
    no_cache: bool = False  # recompute the analysis even when a cached one matches


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoverSettings:
    """Every default of ``afmkit compress recover`` (``afmkit.compress.recover``)."""

    teacher: str = "smollm2-135m-instruct"  # the float model to distil from (same tokenizer)
    data: str | None = None  # UTF-8 generic text to distil on, never the evaluation text
    data_start: int = 0  # first character of --data used
    out: str | None = None  # the adapter's directory; None: MODEL_DIR/recovery (loaded by default)
    # What trains: "lora" (an adapter over the frozen compressed model), "tables" (the palettized
    # look-up tables and scales, written as a new model directory ``out``), or "both".
    train: str = "lora"
    steps: int = 200
    batch: int = 4  # rows per step
    seq_len: int = 512  # tokens per row
    rank: int = 16
    alpha: float = 32.0
    # Continue the adapter the model loads with (its recovery adapter; for smollm2-135m-afm-3.5bpw the
    # post-training adapter stacked on it), its rank and alpha, instead of a fresh one.
    init_from_recovery: bool = False
    lr: float = 1e-3  # AdamW peak; a linear warm-up then a cosine to a tenth
    warmup: int = 10
    top_k: int = 64  # the teacher's most likely tokens kept per position; the rest lumped
    eval_rows: int = 8  # held-out rows (the end of the text window) scored before and after
    save_every: int = 50
    seed: int = 0
    resume: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class NamedCompressedSettings:
    """A named compressed model (``afmkit.compress.named``): how it is built from its float model
    on first load, every setting in one place. The build's inputs are the float weights and two
    committed files in ``afmkit/resources/<folder>``: ``recipe.json`` (bits per matrix) and
    ``importance.safetensors`` (the k-means weights); the calibration fields say how those files
    were made (``named.make_resources``), so the build itself runs no model and reads no text."""

    name: str  # what ``afmkit.load`` and ``--model`` take
    base: str  # the float model it is built from (a known model or a path)
    folder: str  # its folder in afmkit/resources (an absolute path: a folder elsewhere, for tests)
    bits_per_weight: float = 3.5  # the budget the committed recipe was allocated under
    group_rows: int = 16  # output rows sharing one look-up table (the recipe must agree)
    per_row_scale: bool = True  # one fp16 scale per output row before clustering (the recipe must agree)
    embed_bits: int = 8  # the embedding's integer bits (the recipe must agree)
    # k-means: the optimal 1-D weighted programme (compress/kmeans.py), weighted by the committed
    # importance: the Fisher diagonal's rank-1 factors (per input, per output; fp16), so the build
    # needs no gradients and gives the same bits on every CPU.
    importance: str = "fisher-rank1-fp16"
    # How the committed files were made (make_resources): tiny shakespeare from character 600,000
    # (never the evaluation text at the start of the file), 8,192 tokens in windows of 512.
    calibration_file: str = "tinyshakespeare_input.txt"
    calibration_start: int = 600_000
    calibration_tokens: int = 8192
    seq_len: int = 512
    sensitivity: str = "proxy"  # how the recipe's allocation measured each matrix (CompressSettings)
