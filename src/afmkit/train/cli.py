"""The ``pretrain`` and ``shard-plan`` sub-commands (registered in ``afmkit.cli``)."""

from __future__ import annotations

import argparse
import json

from afmkit.errors import UserError


def register(commands: argparse._SubParsersAction) -> None:
    from afmkit.train.settings import RECIPES, PretrainConfig

    d = PretrainConfig(out="")  # the defaults: PretrainConfig is their one source

    p = commands.add_parser("pretrain", help="pre-train a model size on a corpus (sharded, checkpointed)")
    p.set_defaults(run=cmd_pretrain, trains=True)
    # Every option below defaults to None, meaning "PretrainConfig's default (or the --recipe's)":
    # the help texts quote PretrainConfig, and config_from_args leaves unset fields to it.
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="a preset of the settings below; flags given explicitly override it. afm-core: AFM's core "
        "pre-training stage (RMSProp-momentum optimizer, LR 0.01, weight decay 3.16e-4, cosine to 0.005 x peak) "
        "scaled down for a CPU (batch 8 x 256 tokens)",
    )
    p.add_argument("--model", help=f"model size from the registry (default {d.model})")
    p.add_argument(
        "--tokenizer",
        help=f"a model name (its tokenizer only), a directory with tokenizer.json, or a .gguf file "
        f"(default {d.tokenizer})",
    )
    p.add_argument("--data", nargs="+", help="text/JSONL files, directories or globs (default: the Python stdlib)")
    p.add_argument("--mesh", help="mesh spec, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    p.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps (default {d.steps}); with --resume, a larger value extends a run",
    )
    p.add_argument("--batch", type=int, help=f"global batch in sequences (default {d.batch})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument(
        "--optimizer",
        choices=["adamw", "afm"],
        help=f"adamw or afm (AFM's RMSProp with momentum) (default {d.optimizer})",
    )
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 10%% of --steps, at most 100)")
    p.add_argument(
        "--final-lr-fraction",
        type=float,
        help=f"cosine floor as a fraction of the peak (default {d.final_lr_fraction:g})",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        help=f"decoupled weight decay per step at the peak LR, not multiplied by the LR (default {d.weight_decay:g}, "
        "AFM's)",
    )
    p.add_argument("--accum", type=int, help=f"gradient-accumulation microbatches per step (default {d.accum})")
    p.add_argument(
        "--seed",
        type=int,
        help=f"seed of the weight initialisation and of the data order (default {d.seed}); the same seed, data "
        "and settings give the same losses step for step",
    )
    p.add_argument(
        "--z-loss",
        type=float,
        help="auxiliary z-loss weight (default: the model size's, AFM's 1e-6)",
    )
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, else bfloat16")
    p.add_argument("--save-every", type=int, help=f"checkpoint every K steps (default {d.save_every})")
    p.add_argument("--keep", type=int, help=f"checkpoints to keep (default {d.keep})")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, loss.png)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (a larger --steps extends a finished run)",
    )
    p.add_argument("--metrics", help="JSONL metrics file (default OUT/metrics.jsonl)")
    p.add_argument("--eval-every", type=int, help=f"held-out loss every N steps (default {d.eval_every}: off)")
    p.add_argument("--profile-dir", help="write a jax.profiler trace here")
    p.add_argument("--profile-steps", help=f"FIRST:LAST steps to trace (default {d.profile_steps})")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (default: from a table)")
    p.add_argument(
        "--log-every",
        type=int,
        help="when stderr is not a terminal, a progress line every N steps (default: every 5%% of the steps)",
    )
    p.add_argument("--coordinator", help="multi-process: coordinator host:port (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="multi-process: process count (or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-process: this process's id (or JAX_PROCESS_ID)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process: let JAX detect the cluster (SLURM, mpirun, TPU pod, Kubernetes) without settings",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")

    s = commands.add_parser("shard-plan", help="each weight's partition spec and per-device memory on a mesh")
    s.set_defaults(run=cmd_shard_plan)
    s.add_argument("--model", required=True, help="model size from the registry")
    s.add_argument("--mesh", required=True, help="mesh spec, e.g. fsdp=-1,tensor=8")
    s.add_argument("--devices", type=int, help="simulate this many devices (default: the devices present)")
    s.add_argument(
        "--optimizer",
        choices=["adamw", "afm"],
        default=d.optimizer,
        help="whose state to count: adamw (two moments) or afm (AFM's RMSProp-momentum: the squared-gradient "
        f"and momentum EMAs), both fp32 and shaped like the weights (default {d.optimizer})",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")


def config_from_args(args: argparse.Namespace):
    """A ``PretrainConfig`` from parsed flags: the options left unset (None) keep PretrainConfig's
    defaults or the recipe's values."""
    import dataclasses

    from afmkit.train.settings import PretrainConfig

    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(PretrainConfig)
        if getattr(args, field.name, None) is not None
    }
    if given.get("data") is not None:
        given["data"] = tuple(given["data"])
    given["quiet"] = args.quiet or args.json
    return PretrainConfig.from_recipe(args.recipe, **given)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from afmkit.train.multihost import initialize

    initialize(
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        force=args.distributed,
    )
    from afmkit.train.pretrain import pretrain

    summary = pretrain(config_from_args(args))
    import jax

    if jax.process_index() == 0:
        if args.json:
            print(json.dumps(summary))
        elif "last_loss" in summary:
            print(
                f"afmkit: trained steps {summary['start_step'] + 1}..{summary['steps']}: loss "
                f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; {summary['out']} "
                f"(metrics {summary['metrics']}, curve {summary['plot']})"
            )
    return 130 if summary.get("interrupted") else 0  # 130: stopped by Ctrl-C, as shells report it


def cmd_shard_plan(args: argparse.Namespace) -> int:
    import jax
    from jax.sharding import AbstractMesh

    from afmkit.config import get_size
    from afmkit.sharding.mesh import MESH_AXES, parse_mesh_spec
    from afmkit.sharding.plan import shard_plan

    config = get_size(args.model)
    devices = args.devices or jax.device_count()
    if devices < 1:
        raise UserError("--devices must be at least 1")
    sizes = parse_mesh_spec(args.mesh, device_count=devices)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)  # shapes only: nothing is allocated
    plan = shard_plan(config, mesh, optimizer=args.optimizer)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "mesh": plan.mesh_shape,
                    "optimizer": plan.optimizer,
                    "weights": [
                        {"name": w.name, "shape": w.shape, "axes": w.axes, "spec": str(w.spec), "shards": w.ways}
                        for w in plan.weights
                    ],
                    "weight_bytes_per_device": plan.weight_bytes_per_device,
                    "optimizer_bytes_per_device": plan.optimizer_bytes_per_device,
                    "total_bytes_per_device": plan.total_bytes_per_device,
                }
            )
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    mesh_text = ",".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    table = Table(title=f"{args.model} on mesh {mesh_text} ({devices} devices)")
    for column in ("weight", "shape", "logical axes", "PartitionSpec", "shards", "fp32 per device"):
        table.add_column(column, justify="right" if column in ("shards", "fp32 per device") else "left")
    for w in plan.weights:
        table.add_row(w.name, str(w.shape), str(w.axes), str(w.spec), str(w.ways), _bytes(w.bytes_per_device))
    console = Console()
    if not console.is_terminal:  # piped: wide enough that specs are never cut
        console = Console(width=160)
    console.print(table)
    console.print(
        f"per device: weights {_bytes(plan.weight_bytes_per_device)} + {plan.optimizer} state "
        f"{_bytes(plan.optimizer_bytes_per_device)} = {_bytes(plan.total_bytes_per_device)} (fp32; "
        "activations not included)"
    )
    return 0


def _bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
