"""The one trainer on a GPU: every objective, full and LoRA, steps as it does on the CPU.
Skipped without a GPU (CI has none); run with ``JAX_PLATFORMS=cuda,cpu`` where there is one.

Both sides run at "highest" matmul precision (true fp32, no TF32), so they differ only in the
order of fp32 sums (~1e-7 relative each), as sharded and unsharded runs do; Adam's normalised
updates carry that over three steps to well under 1e-4 of the loss (the bound of
test_objectives.py's sharded check)."""

import jax
import numpy as np
import pytest
from test_objectives import OBJECTIVES, SUBSETS, run_unsharded


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = pytest.mark.skipif(not _gpus(), reason="no GPU (run with JAX_PLATFORMS=cuda,cpu where there is one)")


@pytest.mark.parametrize("subset_name", list(SUBSETS))
@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
def test_gpu_steps_equal_cpu(objective_name, subset_name):
    objective, make_batches = OBJECTIVES[objective_name]
    subset = SUBSETS[subset_name]
    batches = make_batches(np.random.default_rng(0))
    results = {}
    for device in (jax.devices("cpu")[0], _gpus()[0]):
        with jax.default_device(device), jax.default_matmul_precision("highest"):
            losses, state = run_unsharded(objective, subset, batches)
        assert {d.platform for leaf in jax.tree.leaves(state.params) for d in leaf.devices()} == {device.platform}
        results[device.platform] = losses
    cpu_losses, gpu_losses = results["cpu"], results["gpu"]
    assert len(set(cpu_losses)) == len(cpu_losses), "the loss moves from step to step (the weights are learning)"
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4, atol=1e-6)
