"""Thread pinning and a description of the machine, shared by the benchmark scripts.

`pin_threads` must run before jax or torch is imported: both size their thread
pools when they start.
"""

import datetime
import importlib.metadata
import os
import platform

# Environment variables that OpenMP, MKL and OpenBLAS read for their thread counts.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# Distributions whose versions a result records.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "gguf", "numpy")


def available_cpus() -> list[int]:
  """Return the ids of the CPUs this process may run on, sorted."""
  return sorted(os.sched_getaffinity(0))


def pin_threads(threads: int) -> dict[str, object]:
  """Restrict this process to its first `threads` CPUs and set the thread variables.

  The affinity mask bounds the cores that XLA's CPU runtime and torch use,
  whatever the sizes of their pools. torch's own intra-op count still has to
  be set with `torch.set_num_threads(threads)` after it is imported.

  Args:
    threads: the number of CPUs, at least 1 and at most `len(available_cpus())`.

  Returns:
    A record of the settings: `threads`, `cpus` (the pinned ids), and the thread
    environment variables with `XLA_FLAGS`.

  Raises:
    ValueError: if `threads` is out of range.
  """
  cpus = available_cpus()
  if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= len(cpus):
    raise ValueError(
        f"threads must be an integer from 1 to {len(cpus)} (the CPUs this"
        f" process may use), got {threads!r}."
    )
  pinned = cpus[:threads]
  os.sched_setaffinity(0, pinned)
  for name in THREAD_ENV_VARS:
    os.environ[name] = str(threads)

  record = {"threads": threads, "cpus": pinned}
  for name in THREAD_ENV_VARS + ("XLA_FLAGS",):
    record[name] = os.environ.get(name)
  return record


def cpu_model() -> str:
  """Return the CPU's model name from /proc/cpuinfo, or `platform.processor()` without it."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          return value.strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
  """Return the CPU feature flags listed in /proc/cpuinfo (empty without it)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
          return set(value.split())
  except OSError:
    pass
  return set()


def memory_gib() -> float | None:
  """Return the total memory from /proc/meminfo in GiB, or None without it."""
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return None


def describe() -> dict[str, object]:
  """Return the CPU model, CPU counts, vector features, memory, versions and date."""
  flags = cpu_flags()
  return {
      "cpu_model": cpu_model(),
      "logical_cpus": os.cpu_count(),
      "available_cpus": len(available_cpus()),
      "vector_features": sorted(flag for flag in flags if flag.startswith(("avx512", "amx"))),
      "memory_gib": memory_gib(),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "versions": package_versions(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def package_versions() -> dict[str, str | None]:
  """Return the installed version of each distribution in `PACKAGES`, None if absent."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions
