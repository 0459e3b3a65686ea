"""Mesh specs, the logical-axis rule table and its strict resolver, and the shard plan."""

import json

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from afmkit.cli import main
from afmkit.config import get_size
from afmkit.errors import UserError
from afmkit.sharding.mesh import MESH_AXES, make_mesh, parse_mesh_spec
from afmkit.sharding.plan import param_specs, shard_plan
from afmkit.sharding.rules import LOGICAL_AXIS_RULES, resolve


def abstract(**sizes):
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2,fsdp=2,tensor=2", device_count=8) == {"data": 2, "fsdp": 2, "seq": 1, "tensor": 2}
    assert parse_mesh_spec("fsdp=-1,tensor=2", device_count=8)["fsdp"] == 4
    assert parse_mesh_spec(None, device_count=8)["data"] == 8
    mesh = make_mesh("fsdp=2,seq=2,tensor=2")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "seq": 2, "tensor": 2}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data=3", "mesh 'data=3' needs 3 devices but 8 are available"),
        ("data=2,fsdp=8", "simulate 16 devices by starting with XLA_FLAGS=--xla_force_host_platform_device_count=16"),
        ("tensor=16,fsdp=-1", "simulate more devices with XLA_FLAGS=--xla_force_host_platform_device_count=N"),
        ("data=3,fsdp=-1", "the fixed axes use 3 devices, which does not divide the 8 devices"),
        ("model=8", "'model=8' is not AXIS=SIZE"),
        ("data=-1,fsdp=-1", "only one axis may be -1"),
        ("data=2,data=4", "axis 'data' given twice"),
        ("data=x", "must be an integer"),
    ],
)
def test_bad_mesh_specs_are_clear_errors(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_mesh_spec(spec, device_count=8)


def test_rule_table_maps_the_documented_axes():
    assert LOGICAL_AXIS_RULES["vocab"] == ("tensor",)
    assert LOGICAL_AXIS_RULES["embed"] == ("fsdp",)
    assert LOGICAL_AXIS_RULES["batch"] == ("data", "fsdp")
    assert LOGICAL_AXIS_RULES["seq"] == ("seq",)
    assert LOGICAL_AXIS_RULES["head_dim"] == ()
    mesh = abstract(data=2, fsdp=2, tensor=2)
    assert resolve(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == PartitionSpec("fsdp", "tensor")
    assert resolve(("batch", "seq"), (8, 32), mesh) == PartitionSpec(("data", "fsdp"))
    assert resolve(("batch", "seq"), (8, 32), abstract(seq=8)) == PartitionSpec(None, "seq")


def test_unmapped_name_double_claim_and_indivisible_dims_are_errors():
    mesh = abstract(fsdp=4, tensor=2)
    with pytest.raises(UserError, match="logical axis 'experts' has no sharding rule"):
        resolve(("experts", "embed"), (8, 64), mesh, name="weight moe")
    # "batch" and "embed" both claim fsdp: an error naming the axis and both logical names
    with pytest.raises(UserError, match="mesh axis 'fsdp' is claimed by both logical axes 'batch' and 'embed'"):
        resolve(("batch", "embed"), (8, 64), mesh)
    with pytest.raises(
        UserError, match="dimension 'kv_heads' of size 2 cannot be split 4 ways over mesh axes tensor=4"
    ):
        param_specs(get_size("test-tiny"), abstract(tensor=4, data=2))


def test_every_weight_has_a_spec_that_divides_it():
    config = get_size("afm-on-device")
    specs = param_specs(config, abstract(data=8, fsdp=16, tensor=8))
    assert specs["embed"] == PartitionSpec("tensor", "fsdp")
    assert specs["layers"][0]["wq"] == PartitionSpec("fsdp", "tensor")
    assert specs["layers"][0]["wo"] == PartitionSpec("tensor", None, "fsdp")
    assert specs["layers"][0]["q_norm"] == PartitionSpec()


def test_shard_plan_memory_for_afm_on_device_without_allocating():
    config = get_size("afm-on-device")
    plan = shard_plan(config, abstract(data=2, fsdp=64, tensor=8), optimizer="afm")
    # Every weight of AFM-on-device divides the 512-way fsdp*tensor split except norm scales
    # and q/k-norms, which are tiny: per-device bytes are within 1% of total/512.
    total = config.total_params * 4
    assert plan.weight_bytes_per_device == pytest.approx(total / 512, rel=0.01)
    assert plan.optimizer_bytes_per_device == 2 * plan.weight_bytes_per_device


def test_shard_plan_cli(capsys):
    assert (
        main(["shard-plan", "--model", "afm-on-device", "--mesh", "fsdp=-1,tensor=8", "--devices", "256", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {"data": 1, "fsdp": 32, "seq": 1, "tensor": 8}
    names = {w["name"]: w for w in out["weights"]}
    assert names["layers/*/w_down"]["spec"] == "P('tensor', 'fsdp')"
    assert out["total_bytes_per_device"] == 3 * out["weight_bytes_per_device"]
    assert main(["shard-plan", "--model", "afm-tiny", "--mesh", "tensor=8"]) == 2
    assert "kv_heads" in capsys.readouterr().err
    assert jax.device_count() == 8  # nothing above touched the real devices' layout


def test_afm_on_device_plan_matches_the_golden_file(capsys):
    """Per-weight partition specs must not drift silently: a change to the rule table or the
    model's logical axes shows up here (regenerate the file with the command below if intended).

    afmkit shard-plan --model afm-on-device --mesh data=2,fsdp=64,tensor=8 --devices 1024 --optimizer afm --json
    """
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "golden_afm_on_device_plan.json").read_text())
    args = ["shard-plan", "--model", "afm-on-device", "--mesh", "data=2,fsdp=64,tensor=8", "--devices", "1024"]
    assert main([*args, "--optimizer", "afm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == golden
