"""Multi-device layout with jax.sharding: a 1-D 'data' mesh, the batch split along its rows.

'data': params and optimizer state replicated, gradients all-reduced by XLA.
'fsdp': every array with a dimension divisible by the device count is split along its largest such
dimension (params, Adam moments alike), gathered by XLA where a matmul needs it.
Multi-host: call jax.distributed.initialize() first; each process generates only the rows of the
global batch (a pure function of (seed, step)) that its devices hold (`host_rows`, `put_rows`).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minilm.schema import check

AXIS = "data"


def make_mesh(devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `devices` devices (0: all, across every host)."""
  available = jax.devices()
  n = devices or len(available)
  check(n <= len(available), "parallel.devices", f"asks for {n} devices; only {len(available)} available")
  me = jax.process_index()
  check(any(d.process_index == me for d in available[:n]), "parallel.devices",
        f"the first {n} of {len(available)} devices hold none of process {me}'s, which would get no rows; "
        f"use 0 (all) or a count that reaches every process")
  return Mesh(np.array(available[:n]), (AXIS,))


def leaf_spec(shape: tuple[int, ...], n: int, strategy: str) -> P:
  if strategy != "fsdp" or n == 1:
    return P()
  dims = [d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n]
  if not dims:
    return P()
  d = max(dims, key=lambda i: shape[i])
  return P(*([None] * d + [AXIS]))


def tree_shardings(tree, mesh: Mesh, strategy: str):
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) by the strategy's rule."""
  n = mesh.devices.size
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), n, strategy)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def check_batch(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  check(batch_size % n == 0, "data.batch_size", f"must be divisible by the {n} devices of the mesh; got {batch_size}")


def host_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(start, stop): the rows of the global batch that this process's devices hold, contiguous on a
  1-D mesh over jax.devices() (they are in process order)."""
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  bounds = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
  assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), f"rows of this process are not contiguous: {bounds}"
  return bounds[0][0], bounds[-1][1]


def any_process(flag: bool) -> bool:
  """Whether `flag` holds in any process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def put_global(tree, shardings):
  """`tree` (the same values in every process) as global arrays laid out by `shardings` (a matching
  tree). jax.device_put of a process's array onto a mesh that spans processes builds arrays whose
  shards orbax cannot read back; each process here places its own devices' slices."""
  def put(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def put_rows(rows: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
  """Global arrays of `batch_size` rows from this process's rows (`host_rows`) alone."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:])) for k, v in rows.items()}
