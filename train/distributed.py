"""Running one training script on several processes (hosts) with `jax.distributed`.

Every process runs the same script. `initialize` connects it to the others
before any JAX computation; from then on `jax.devices()` lists the devices of
all processes and the mesh spans them. Each process feeds only its own block
of each batch's rows (`process_train_batches`, `process_eval_batches`),
and files are written once: orbax checkpoints by all processes together
(each array once), exports by process 0 alone after `fetch`.

The settings come from the arguments or, where an argument is None, from the
environment variables that `jax.distributed` reads:

    JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator service
    JAX_NUM_PROCESSES         the number of processes
    JAX_PROCESS_ID            this process's index, 0 to JAX_NUM_PROCESSES - 1
"""

import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxlora.train import data
from jaxlora.train import mesh as mesh_lib

logger = logging.getLogger(__name__)

ADDRESS_VARIABLE = "JAX_COORDINATOR_ADDRESS"
COUNT_VARIABLE = "JAX_NUM_PROCESSES"
INDEX_VARIABLE = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300
RETRY_INTERVAL_S = 0.25


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> bool:
  """Connect this process to the others of a multi-process run.

  Call it first, before anything else uses JAX. A process other than 0 first
  waits, for at most `timeout_s` seconds, until the coordinator's port
  accepts a connection, and raises if it never does: `jax.distributed` would
  instead abort the whole process when its own deadline passes.

  Args:
    coordinator_address: `host:port` of process 0; `JAX_COORDINATOR_ADDRESS`
      if None.
    num_processes: the number of processes; `JAX_NUM_PROCESSES` if None.
    process_id: this process's index; `JAX_PROCESS_ID` if None.
    auto: when none of the three is set, let `jax.distributed` detect the
      cluster itself (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes).
    timeout_s: seconds to wait for the coordinator and for all processes to
      join.

  Returns:
    True if this process joined a multi-process run, False for a single
    process (nothing set, or one process).

  Raises:
    ValueError: if only some of the three settings are given, or one is
      malformed, or process 0's port is already in use.
    TimeoutError: if the coordinator cannot be reached within `timeout_s`.
  """
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
    raise ValueError(f"timeout_s must be a whole number of seconds >= 1, got {timeout_s!r}.")
  address = coordinator_address or os.environ.get(ADDRESS_VARIABLE) or None
  count = _env_int(num_processes, COUNT_VARIABLE)
  index = _env_int(process_id, INDEX_VARIABLE)
  cluster = _get_cluster(address, count, index, auto)
  if cluster is None:
    if not auto:
      logger.info("No coordinator address is set; running as a single process.")
      return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(initialization_timeout=timeout_s)
    _log_joined()
    return True

  host, port, count, index = cluster
  if count == 1:
    logger.info("num_processes is 1; running as a single process.")
    return False
  if index == 0:
    _check_port_free(port, address)
  else:
    wait_for_coordinator(host, port, timeout_s=timeout_s)

  # CPU devices of different processes exchange data with gloo; GPU and TPU
  # devices ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count,
      process_id=index,
      initialization_timeout=timeout_s,
  )
  _log_joined()
  return True


def wait_for_coordinator(host: str, port: int, *, timeout_s: float) -> None:
  """Wait until `host:port` accepts a TCP connection, for at most `timeout_s` seconds.

  Raises:
    TimeoutError: naming the address and the last connection error.
  """
  deadline = time.monotonic() + timeout_s
  attempts = 0
  while True:
    attempts += 1
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(min(remaining, 5.0), 0.1)):
        logger.info("The coordinator at %s:%d is reachable.", host, port)
        return
    except OSError as error:
      if time.monotonic() + RETRY_INTERVAL_S >= deadline:
        raise TimeoutError(
            f"Timed out after {timeout_s:g} s ({attempts} attempts) waiting for"
            f" the coordinator at {host}:{port}: {error}. Start process 0 first,"
            f" check the address ({ADDRESS_VARIABLE} or coordinator_address) and"
            " that the port is open between the hosts, or raise timeout_s."
        ) from error
    time.sleep(RETRY_INTERVAL_S)


def is_primary() -> bool:
  """Return whether this is process 0, the one that writes exports and logs results."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier called `name`; no-op on one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
  """Return `tree` as numpy arrays, whole on every process.

  Every process must call it: on several processes it gathers the shards
  that other processes have.

  NOTE: every process then keeps the whole tree in host memory. For models
  larger than a host's memory, save an orbax checkpoint instead.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def process_examples(examples: data.TokenizedExamples, mesh: Mesh) -> data.TokenizedExamples:
  """Return the examples this process trains on: every `slot_count`-th from its slot.

  On one process, all of them in their order.

  Raises:
    ValueError: if there are fewer examples than process blocks.
  """
  slot, slot_count = mesh_lib.process_batch_slot(mesh)
  if len(examples) < slot_count:
    raise ValueError(
        f"{len(examples)} examples cannot feed {slot_count} process blocks;"
        f" provide at least {slot_count} examples."
    )
  return examples.subset(range(slot, len(examples), slot_count))


def process_train_batches(
    examples: data.TokenizedExamples,
    mesh: Mesh,
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
) -> Iterator[data.Batch]:
  """Return this process's endless iterator of training rows, `[b, T]` batches.

  Args:
    examples: all training examples; this process keeps its share
      (`process_examples`).
    mesh: the training mesh.
    batch_size: B, the global rows per batch; b = B / slot_count.
    seed: seed of the shuffling, the same on every process.
    start_batch: batches to skip, to resume where a run stopped.

  Raises:
    ValueError: if B is not a multiple of the number of process blocks.
  """
  local_size = _local_batch_size(batch_size, mesh)
  local = process_examples(examples, mesh)
  # Every process's rows join one global array, so all batches keep the full width.
  return data.train_batches(
      local, batch_size=local_size, seed=seed, start_batch=start_batch,
      pad_to_multiple_of=None,
  )


def process_eval_batches(
    examples: data.TokenizedExamples,
    mesh: Mesh,
    *,
    batch_size: int,
) -> list[data.Batch]:
  """Return this process's held-out batches `[b, T]`, as many on every process.

  Every process gets `ceil(len(examples) / batch_size)` batches; a process
  whose share runs out first gets filler batches (all masks zero), which
  add nothing to the loss.

  Raises:
    ValueError: if B is not a multiple of the number of process blocks.
  """
  local_size = _local_batch_size(batch_size, mesh)
  slot, slot_count = mesh_lib.process_batch_slot(mesh)
  local = examples.subset(range(slot, len(examples), slot_count))
  batches = (
      data.eval_batches(local, batch_size=local_size, pad_to_multiple_of=None)
      if len(local) else []
  )
  count = math.ceil(len(examples) / batch_size)
  while len(batches) < count:
    batches.append(data.collate(local, [], local_size))
  return batches


def _local_batch_size(batch_size, mesh):
  _, slot_count = mesh_lib.process_batch_slot(mesh)
  if batch_size % slot_count:
    raise ValueError(
        f"batch_size={batch_size} cannot be split over {slot_count} process"
        f" blocks; use a multiple of {slot_count}."
    )
  return batch_size // slot_count


def _get_cluster(address, count, index, auto):
  """Return `(host, port, count, index)`, or None when nothing is set."""
  given = {
      f"coordinator_address ({ADDRESS_VARIABLE})": address,
      f"num_processes ({COUNT_VARIABLE})": count,
      f"process_id ({INDEX_VARIABLE})": index,
  }
  if all(value is None for value in given.values()):
    return None
  missing = [name for name, value in given.items() if value is None]
  if missing:
    raise ValueError(
        f"Multi-process settings are incomplete: {', '.join(missing)} not set."
        " Set all three, or none for a single process"
        f"{' (auto=True detects a supported cluster)' if not auto else ''}."
    )

  host, _, port_text = address.rpartition(":")
  if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
    raise ValueError(
        f"coordinator_address {address!r} is not host:port; use for example"
        " '10.0.0.2:1234' with the port process 0 listens on."
    )
  if count < 1:
    raise ValueError(f"num_processes must be at least 1, got {count}.")
  if not 0 <= index < count:
    raise ValueError(
        f"process_id {index} is outside [0, {count - 1}] for {count} processes;"
        " number the processes from 0."
    )
  return host.strip("[]"), int(port_text), count, index


def _env_int(value, variable):
  """Return `value`, or the integer in the environment variable when it is None."""
  if value is not None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{variable.lower()} must be an integer, got {value!r}.")
    return int(value)
  text = os.environ.get(variable)
  if text is None or text == "":
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{variable}={text!r} is not an integer.") from None


def _check_port_free(port, address):
  """Raise if process 0 cannot listen on `port`, before jax.distributed aborts on it."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    try:
      probe.bind(("", port))
    except OSError as error:
      raise ValueError(
          f"Process 0 cannot listen on port {port} of coordinator_address"
          f" {address!r}: {error}. Choose a free port."
      ) from error


def _log_joined():
  logger.info(
      "Process %d of %d joined; %d local and %d global devices.",
      jax.process_index(), jax.process_count(),
      jax.local_device_count(), jax.device_count(),
  )
