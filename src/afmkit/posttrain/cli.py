"""``afmkit posttrain <recipe>``: one sub-command per post-training recipe.

Each recipe module has ``register(recipes)``, which adds its parser to the ``posttrain`` group
and sets ``run`` with ``set_defaults``, exactly like the top-level command groups.
"""

from __future__ import annotations

import argparse
import importlib

# Modules with a ``register(recipes)`` function, in the order ``afmkit posttrain --help`` lists them.
RECIPES: tuple[str, ...] = (
    "afmkit.posttrain.sft",
    "afmkit.posttrain.synth_if",
    "afmkit.posttrain.itec",
    "afmkit.posttrain.edit_data",
    "afmkit.posttrain.loop_cut",
    "afmkit.posttrain.reward",
    "afmkit.posttrain.rl",
    "afmkit.posttrain.dpo",
)


def register(commands: argparse._SubParsersAction) -> None:
    posttrain = commands.add_parser(
        "posttrain", help="post-training recipes: sft, synth-if, itec, edit-data, loop-cut, reward, rl, dpo"
    )
    recipes = posttrain.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for module in RECIPES:
        importlib.import_module(module).register(recipes)
