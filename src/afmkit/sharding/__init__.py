"""Device meshes and logical-axis sharding.

* :mod:`afmkit.sharding.mesh`: a mesh with the named axes ``data``, ``fsdp``, ``seq``, ``tensor``
  built from a spec string such as ``data=2,fsdp=2,tensor=2``.
* :mod:`afmkit.sharding.rules`: the table mapping the model's logical axis names to mesh axes
  (kept as data) and the strict resolver that turns logical names into ``PartitionSpec``s.
* :mod:`afmkit.sharding.activations`: ``constrain(x, names)``, the hook the model calls to pin
  an activation's layout; it is the identity unless a training mesh is active.
* :mod:`afmkit.sharding.plan`: per-weight partition specs and per-device memory (``shard-plan``).

This package's ``__init__`` imports nothing, so the model can import ``activations`` without
a cycle.
"""
