"""The accuracy-recovery adapter: ``afmkit compress recover``.

A rank-16 LoRA adapter trained on the frozen compressed (palettized) model by distillation from
the float model, AFM's recipe (spec section 6): the objective is KL(teacher || student) of the
next-token distributions (``train.objectives.Distillation``: the teacher's top-k probabilities
and the rest lumped into one bucket), on generic text, on the one trainer (``train.finetune``
over ``train.step``). The teacher's top-k are computed once per row before training (a forward
pass of the float model, chunked like the loss), so the step never holds the teacher.

The adapter is saved in the PEFT layout in ``MODEL_DIR/recovery`` (or ``--out``) with
``recovery.json`` (settings, data, held-out KL before and after, times); ``afmkit.load(MODEL_DIR)``
applies ``MODEL_DIR/recovery`` by default (``recovery=False`` leaves it off) and ``afmkit adapter
train --init-from-recovery`` starts a task adapter from it. Checkpoints, ``metrics.jsonl`` and
``loss.png`` go to ``OUT.run/``; ``--resume`` continues from the last checkpoint (the teacher's
top-k are recomputed: the same rows give the same values).

``--train tables`` trains the look-up tables instead (``PalettizedTables``: every palettized
matrix's table values and per-row scales, the indices fixed), on the same objective and trainer,
and writes the model with the trained tables to ``--out`` (a new model directory, never the
compressed model itself; the bits per weight unchanged); ``--train both`` trains the tables and
the adapter together and writes that directory with the adapter in ``OUT/recovery``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afmkit import cli_args
from afmkit.compress.settings import RecoverSettings
from afmkit.errors import UserError

if TYPE_CHECKING:
    from afmkit.adapters.lora import LoraConfig

RECOVERY_DIR = "recovery"  # inside a compressed model's directory: applied when it loads
RESULTS_FILE = "recovery.json"
TRAIN_CHOICES = ("lora", "tables", "both")  # what recovery trains: the adapter, the tables, or both


def check_settings(settings: RecoverSettings) -> RecoverSettings:
    """One line for each setting that cannot work, before anything is loaded."""
    if settings.steps < 1:
        raise UserError(f"--steps must be positive, got {settings.steps}; e.g. --steps 200")
    if settings.batch < 1 or settings.seq_len < 2:
        raise UserError(f"--batch must be positive and --seq-len at least 2 (got {settings.batch}, {settings.seq_len})")
    if settings.eval_rows < 1:
        raise UserError(f"--eval-rows must be positive, got {settings.eval_rows}")
    if settings.data is None:
        raise UserError("recovery needs --data: a UTF-8 text file of generic text (never the evaluation text)")
    if settings.train not in TRAIN_CHOICES:
        raise UserError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, not {settings.train!r}")
    if settings.init_from_recovery and settings.train != "lora":
        raise UserError(f"--init-from-recovery continues an adapter; it needs --train lora, not {settings.train}")
    if settings.train != "lora" and settings.out is None:
        raise UserError(
            f"--train {settings.train} writes a new model directory with the trained tables: give --out DIR "
            "(the compressed model itself is never overwritten)"
        )
    return settings


def output_dir(model_dir: str | Path, settings: RecoverSettings) -> Path:
    return Path(settings.out) if settings.out else Path(model_dir) / RECOVERY_DIR


def _is_palettized_weight(x: Any) -> bool:
    from afmkit.model.palettized import PalettizedWeight

    return isinstance(x, PalettizedWeight)


@dataclasses.dataclass(frozen=True)
class PalettizedTables:
    """A trainable subset (as ``train.trainable.LoraWeights``): every palettized matrix's table
    values and per-row scales, over the frozen compressed base whose indices (and every other
    weight) stay fixed; with ``lora``, a LoRA adapter trains beside them.

    The trained tree holds offsets from the base, zero at the start like an adapter's ``B``:
    matrix ``i``'s tables are ``base + offset * m`` (``m``: each group's largest base table
    magnitude) and its scales ``base * (1 + offset)``, so every trained number is of order one
    and one learning rate suits tables, scales and adapter alike. The forward pass sees the
    values rounded to fp16, as they are stored (a straight-through rounding: the gradient is the
    fp32 one), so the held-out KL after training is the saved model's."""

    # per palettized matrix, in the params' flattening order: (tables shape, scales length or None)
    shapes: tuple[tuple[tuple[int, int], int | None], ...]
    lora: LoraConfig | None = None

    @classmethod
    def of(cls, params: Any, lora: LoraConfig | None = None) -> PalettizedTables:
        import jax

        weights = [w for w in jax.tree.leaves(params, is_leaf=_is_palettized_weight) if _is_palettized_weight(w)]
        shapes = tuple((tuple(w.tables.shape), None if w.scales is None else int(w.scales.shape[0])) for w in weights)
        return cls(shapes=shapes, lora=lora)

    def init(self, config: Any, key: Any) -> Any:
        import jax.numpy as jnp

        offsets = {}
        for i, (tables, scales) in enumerate(self.shapes):
            offsets[str(i)] = {"tables": jnp.zeros(tables, jnp.float32)}
            if scales is not None:
                offsets[str(i)]["scales"] = jnp.zeros((scales,), jnp.float32)
        tree = {"tables": offsets}
        if self.lora is not None:
            tree["lora"] = self._lora_subset().init(config, key)
        return tree

    def abstract(self, config: Any) -> Any:
        import jax

        return jax.eval_shape(lambda key: self.init(config, key), jax.random.PRNGKey(0))

    def shardings(self, config: Any, mesh: Any) -> Any:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        replicated = NamedSharding(mesh, PartitionSpec())  # one device (recover's mesh)
        return jax.tree.map(lambda _: replicated, self.abstract(config))

    def frozen_shardings(self, config: Any, frozen: Any, mesh: Any) -> Any:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        if frozen is None:
            raise ValueError("training the tables needs the frozen compressed base")
        if mesh.size > 1:
            raise UserError("training palettized tables runs on one device")
        replicated = NamedSharding(mesh, PartitionSpec())
        return jax.tree.map(lambda _: replicated, frozen)

    def apply(self, weights: Any, frozen: Any, *, config: Any, compute_dtype: Any) -> tuple[Any, Any]:
        from afmkit.train.trainable import cast_floats

        base = cast_floats(self.params(weights, frozen), compute_dtype)
        if self.lora is None:
            return base, None
        return base, self._lora_subset().apply(weights["lora"], frozen, config=config, compute_dtype=compute_dtype)[1]

    def params(self, weights: Any, frozen: Any) -> Any:
        """``frozen`` with the trained tables and scales (fp32 holding fp16-representable values;
        differentiable with respect to ``weights``)."""
        import jax
        import jax.numpy as jnp

        def stored(x: Any) -> Any:  # rounded to fp16 going forward, the identity going back
            return x + jax.lax.stop_gradient(x.astype(jnp.float16).astype(jnp.float32) - x)

        leaves, treedef = jax.tree.flatten(frozen, is_leaf=_is_palettized_weight)
        out, i = [], 0
        for leaf in leaves:
            if _is_palettized_weight(leaf):
                offset = weights["tables"][str(i)]
                tables = leaf.tables.astype(jnp.float32)
                magnitude = jnp.max(jnp.abs(tables), axis=1, keepdims=True)
                magnitude = jnp.where(magnitude > 0, magnitude, 1.0)
                scales = leaf.scales
                if scales is not None:
                    scales = stored(scales.astype(jnp.float32) * (1.0 + offset["scales"]))
                leaf = dataclasses.replace(leaf, tables=stored(tables + offset["tables"] * magnitude), scales=scales)
                i += 1
            out.append(leaf)
        return jax.tree.unflatten(treedef, out)

    def stored_params(self, weights: Any, frozen: Any) -> Any:
        """The trained model's weights as saved: tables and scales in fp16, host arrays."""
        import jax
        import jax.numpy as jnp

        def to_fp16(x: Any) -> Any:
            if _is_palettized_weight(x):
                scales = None if x.scales is None else jnp.asarray(x.scales, jnp.float16)
                return dataclasses.replace(x, tables=jnp.asarray(x.tables, jnp.float16), scales=scales)
            return x

        trained = self.params(jax.tree.map(jnp.asarray, weights), frozen)
        return jax.tree.map(to_fp16, trained, is_leaf=_is_palettized_weight)

    def adapter(self, weights: Any, config: Any, *, name: str = "") -> Any:
        return self._lora_subset().adapter(weights["lora"], config, name=name)

    def _lora_subset(self) -> Any:
        from afmkit.train.trainable import LoraWeights

        return LoraWeights(self.lora)


def check_same_tokenizer(student: Any, teacher: Any, teacher_name: str) -> None:
    """Distillation compares distributions token by token: both must use one vocabulary."""
    same = student.config.vocab_size == teacher.config.vocab_size and student.tokenizer.backend.get_vocab(
        with_added_tokens=True
    ) == teacher.tokenizer.backend.get_vocab(with_added_tokens=True)
    if not same:
        raise UserError(
            f"teacher {teacher_name!r} has another tokenizer than the compressed model; "
            "give the float model it was compressed from (--teacher)"
        )


def recover(
    model_dir: str | Path,
    settings: RecoverSettings,
    *,
    student: Any = None,
    teacher: Any = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and save the recovery adapter of the compressed model in ``model_dir`` (or, as
    ``settings.train`` says, its tables, or both, saved as a new model directory ``settings.out``);
    returns the results (also saved as ``recovery.json`` beside the adapter, or in that directory)
    and the trained tree (``weights``: the subset's, host arrays). ``student``/``teacher``:
    already loaded models (tests), else loaded from ``model_dir`` (without its recovery adapter)
    and ``settings.teacher`` (float32)."""
    import afmkit
    from afmkit.adapters.lora import LoraConfig
    from afmkit.adapters.peft_io import save_adapter
    from afmkit.compress.cli import RECIPE_FILE, REPORT_FILE
    from afmkit.compress.palettize import bits_per_weight
    from afmkit.eval.perplexity import read_text
    from afmkit.interop import native
    from afmkit.model.palettized import is_palettized
    from afmkit.train.finetune import FinetuneRun, finetune
    from afmkit.train.objectives import Distillation, DistillBatch
    from afmkit.train.optim import OptimizerConfig
    from afmkit.train.step import StepConfig
    from afmkit.train.teacher import add_teacher, text_rows
    from afmkit.train.trainable import LoraWeights

    settings = check_settings(settings)
    if settings.train != "lora" and Path(settings.out).resolve() == Path(model_dir).resolve():
        raise UserError(
            f"--out {settings.out} is the compressed model itself; give a new directory for the trained one"
        )
    clock = time.perf_counter
    seconds: dict[str, float] = {}
    begin = clock()
    if student is None:
        student = afmkit.load(model_dir, recovery=settings.init_from_recovery)
    if not is_palettized(student.params):
        raise UserError(
            f"{model_dir} is not a compressed model (no palettized weights); "
            "make one with 'afmkit compress palettize' and recover that"
        )
    if teacher is None:
        teacher = afmkit.load(settings.teacher, dtype="float32")
    check_same_tokenizer(student, teacher, settings.teacher)
    seconds["load"] = clock() - begin

    begin = clock()
    text = read_text(settings.data)
    if not 0 <= settings.data_start < len(text):
        raise UserError(f"--data-start {settings.data_start} is outside {settings.data} ({len(text)} characters)")
    window = text[settings.data_start :]
    all_rows = text_rows(student.tokenizer.encode(window), settings.seq_len)
    n_rows = len(all_rows["tokens"])
    if n_rows < settings.eval_rows + 1:
        raise UserError(
            f"{settings.data} from character {settings.data_start} holds {n_rows} rows of {settings.seq_len} "
            f"tokens; recovery needs more than --eval-rows {settings.eval_rows}: give more text"
        )
    # Held out: the window's last rows; trained: the first ones, no more than the steps consume.
    n_train = min(n_rows - settings.eval_rows, settings.steps * settings.batch)
    train_rows = {name: a[:n_train] for name, a in all_rows.items()}
    eval_rows = {name: a[n_rows - settings.eval_rows :] for name, a in all_rows.items()}
    seconds["tokenize"] = clock() - begin

    begin = clock()
    train_rows = add_teacher(teacher, train_rows, k=settings.top_k, batch=settings.batch, quiet=quiet)
    eval_rows = add_teacher(teacher, eval_rows, k=settings.top_k, batch=settings.batch, quiet=True)
    seconds["teacher"] = clock() - begin
    del teacher  # only its top-k are needed from here on

    out = output_dir(model_dir, settings)
    lora = LoraConfig(rank=settings.rank, alpha=settings.alpha, dtype="float16")
    initial = None
    if settings.init_from_recovery:
        if student.adapter is None:
            raise UserError(
                f"--init-from-recovery: {model_dir} loads with no adapter to continue; drop the flag to train a new one"
            )
        lora = dataclasses.replace(student.adapter.config, dtype="float16")  # its rank, alpha and targets
        initial = LoraWeights.tree(student.adapter)
    if settings.train == "lora":
        subset = LoraWeights(lora)
    else:
        subset = PalettizedTables.of(student.params, lora=lora if settings.train == "both" else None)
    run = FinetuneRun(
        subset=subset,
        objective=Distillation(),
        optimizer=OptimizerConfig(
            name="adamw",
            peak_lr=settings.lr,
            warmup_steps=min(settings.warmup, settings.steps - 1),
            total_steps=settings.steps,
            final_lr_fraction=0.1,
            weight_decay=0.0,
        ),
        step_config=StepConfig(),
        batch=settings.batch,
        steps=settings.steps,
        seed=settings.seed,
        run_dir=Path(f"{out}.run"),
        save_every=settings.save_every,
        resume=settings.resume,
        progress=not quiet,
        batch_type=DistillBatch,
        eval_metric="kl",
        initial=initial,
    )
    results: dict[str, Any] = {
        "model": str(model_dir),
        "teacher": settings.teacher,
        "settings": dataclasses.asdict(settings),
        "data": {
            "file": str(settings.data),
            "start_char": settings.data_start,
            "chars": len(window),
            "rows_available": n_rows,
            "train_rows": n_train,
            "train_tokens": n_train * settings.seq_len,
            "held_out_rows": settings.eval_rows,
        },
        "objective": "KL(teacher || student), teacher top-k + lumped tail, every position",
        "trained": {
            "lora": "a LoRA adapter over the frozen compressed model",
            "tables": "every palettized matrix's look-up tables and per-row scales (indices fixed)",
            "both": "the palettized look-up tables and scales, and a LoRA adapter",
        }[settings.train],
    }
    if settings.train != "lora":
        results["bits_per_weight"] = bits_per_weight(student.params)  # unchanged: only values move

    def save_model(params: Any, done: int) -> None:
        """``--train tables|both``: the model with its trained tables (and the adapter)."""
        results["steps_done"] = done
        trained_params = subset.stored_params(params, student.params)
        adapter = subset.adapter(params, student.config, name="recovery") if subset.lora is not None else None
        native.save_checkpoint(out, student.config, trained_params, student.tokenizer, default_adapter=adapter)
        for name in (RECIPE_FILE, REPORT_FILE):  # what made the compressed model, as palettize writes them
            if (Path(model_dir) / name).is_file():
                shutil.copyfile(Path(model_dir) / name, out / name)
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")

    def save(params: Any, done: int) -> None:
        if settings.train != "lora":
            return save_model(params, done)
        results["steps_done"] = done
        save_adapter(
            out,
            subset.adapter(params, student.config, name="recovery"),
            config=student.config,
            params=student.params,
            base_name=str(model_dir),
            extra_files={RESULTS_FILE: json.dumps(results, indent=2)},
        )

    def save_before_the_end(params: Any, done: int) -> None:
        if done < settings.steps:  # the last save comes below, with the held-out KL after training
            save(params, done)

    begin = clock()
    trained = finetune(student, train_rows, run, eval_rows=eval_rows, on_save=save_before_the_end)
    seconds["train"] = clock() - begin
    results["held_out_kl_before"] = trained["eval_before"]
    results["held_out_kl_after"] = trained["eval_after"]
    results["seconds_per_step"] = trained["seconds"] / max(1, trained["steps_done"] - trained["start_step"])
    results["seconds"] = {**seconds, "total": sum(seconds.values())}
    save(trained["params"], trained["steps_done"])
    return {**results, "weights": trained["params"]}


# -- the command ----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``compress recover``; every default is ``RecoverSettings``'."""
    d = RecoverSettings()
    p.add_argument("--model", required=True, help="a compressed model's directory ('afmkit compress palettize --out')")
    p.add_argument(
        "--teacher",
        default=d.teacher,
        help=f"the float model to distil from, its default adapter applied (e.g. smollm2-135m-afm) (default {d.teacher})",
    )
    p.add_argument("--data", required=True, help="UTF-8 generic text to distil on; never the text you evaluate on")
    p.add_argument(
        "--data-start", type=int, default=d.data_start, help=f"first character of --data used (default {d.data_start})"
    )
    p.add_argument(
        "--train",
        choices=TRAIN_CHOICES,
        default=d.train,
        help="lora: an adapter over the frozen compressed model; tables: the look-up tables and per-row scales "
        f"(indices fixed), saved as a new model in --out; both: the tables and an adapter (default {d.train})",
    )
    p.add_argument(
        "--out",
        default=d.out,
        help="adapter directory (default MODEL/recovery, applied when MODEL loads); with --train tables or both, "
        "the new model directory (required)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"rows per step (default {d.batch})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per row (default {d.seq_len})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    p.add_argument(
        "--init-from-recovery",
        action="store_true",
        default=d.init_from_recovery,
        help="continue the adapter the model loads with (its recovery adapter; for smollm2-135m-afm-3.5bpw "
        "the post-training adapter stacked on it), its rank and alpha, instead of a new one",
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument(
        "--top-k",
        type=int,
        default=d.top_k,
        help=f"teacher tokens kept per position, the rest lumped (default {d.top_k})",
    )
    p.add_argument(
        "--eval-rows", type=int, default=d.eval_rows, help=f"held-out rows scored before/after (default {d.eval_rows})"
    )
    p.add_argument(
        "--save-every", type=int, default=d.save_every, help=f"save the adapter every N steps (default {d.save_every})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"adapter init and data order (default {d.seed})")
    p.add_argument("--resume", action="store_true", default=d.resume, help="continue from OUT.run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> RecoverSettings:
    return check_settings(cli_args.settings_from_args(RecoverSettings, args))


def cmd_recover(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    results = recover(args.model, settings, quiet=args.quiet)
    out = output_dir(args.model, settings)
    print(
        f"{out}: {settings.train} trained; held-out KL to {settings.teacher} {results['held_out_kl_before']:.4f} -> "
        f"{results['held_out_kl_after']:.4f} nats/token after {results['steps_done']} steps; "
        f"{results['seconds']['total']:.0f} s"
    )
    return 0
