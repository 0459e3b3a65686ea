"""`afmkit posttrain sft` with the input gradients of the quantized base in fp32 (the code before
session 52's change computed them in fp32): the A arm of the A/B."""

import sys

from afmkit import cli
from afmkit.model import packed, palettized

fp32 = packed.input_gradient


def input_gradient(grad, weight_t, bf16):
    return fp32(grad, weight_t, False)


packed.input_gradient = palettized.input_gradient = input_gradient
sys.exit(cli.main(sys.argv[1:]))
