"""A tiny causal LM built offline from the sample data: the stand-in for a real HF model in tests and demo.

It looks like Qwen2.5-Instruct from the outside (byte-level BPE, ChatML chat template, EOS ``<|im_end|>``,
pad ``<|endoftext|>``, no BOS) but has ~2000 tokens of vocabulary, two layers and random weights, so it
builds in seconds with no network. The build is deterministic and cached under a key that covers the
sample files, the builder version and the architecture; it is written to a temporary directory and
renamed into place, so an interrupted build never looks complete and concurrent builders do not clash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parallel.cachedbuild import REPO_ROOT, build_cached, default_cache_root
from parallel.errors import PloraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump when the build changes in a way the sample files do not show (config, template, trainer settings).
BUILDER_VERSION = 2
VOCAB_SIZE = 2000
SEED = 0
MAX_LENGTH = 4096
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
MARKER_NAME = "plora_tiny_model.json"
# Qwen2.5's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML as Qwen2.5 writes it, without Qwen's default system message and tool calling.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# One model shape for every architecture; only the config class differs.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": MAX_LENGTH,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    # Larger than HF's 0.02: with frozen tied embeddings that small, RMSNorm caps every logit near
    # +-1, so no adapter could lower the loss visibly (the demo shows it falling).
    "initializer_range": 0.08,
}

# Architecture -> transformers config class name (looked up lazily: importing transformers is slow).
CONFIG_CLASSES: dict[str, str] = {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}
ARCHS: tuple[str, ...] = tuple(CONFIG_CLASSES)

DATA_DIR = REPO_ROOT / "data"


def sample_files(data_dir: Path = DATA_DIR) -> list[Path]:
    """The sample files the tokenizer is trained on (and the cache key covers), in name order."""
    files = sorted(p for p in data_dir.glob("sample_*") if p.is_file())
    if not files:
        raise PloraError(f"{data_dir}: no sample_* files to train the tiny model's tokenizer on")
    return files


def tiny_model_key(files: Sequence[Path], arch: str) -> str:
    """Cache key: builder version, architecture, and the name and bytes of every sample file."""
    digest = hashlib.sha256(f"plora-tiny-model:{BUILDER_VERSION}:{arch}\n".encode())
    for path in files:
        digest.update(f"{path.name}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def ensure_tiny_model(cache_dir: Path | None = None, arch: str = "qwen2") -> Path:
    """Return the directory of the tiny model, building it on first use.

    ``cache_dir`` is the cache root (default ``$PLORA_CACHE`` or ``<repo>/.cache``); the model lives in
    ``<root>/tiny-model-<arch>-<key>``. It loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``. Treat it as read-only: copy it before changing anything in it.
    """
    _check_arch(arch)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_tiny_model(root / f"tiny-model-{arch}-{tiny_model_key(sample_files(), arch)}", arch)


def build_tiny_model(out_dir: Path, arch: str = "qwen2", *, overwrite: bool = False) -> Path:
    """Build the tiny model into ``out_dir`` atomically and return it; nothing to do if it is already
    there (see :func:`parallel.cachedbuild.build_cached`)."""
    _check_arch(arch)
    files = sample_files()
    marker = {
        "builder_version": BUILDER_VERSION,
        "arch": arch,
        "key": tiny_model_key(files, arch),
        "sample_files": [p.name for p in files],
    }
    return build_cached(
        out_dir,
        marker,
        MARKER_NAME,
        lambda tmp: _write_model(tmp, arch, files),
        what="the tiny model",
        overwrite=overwrite,
    )


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise PloraError(f"unknown tiny model architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def sample_texts(files: Sequence[Path]) -> Iterator[str]:
    """Every piece of text in the sample files: plain text as is, every string inside JSON/JSONL."""
    for path in files:
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            yield from _strings(json.loads(raw))
        elif path.suffix == ".jsonl":
            for line in raw.splitlines():
                if line.strip():
                    yield from _strings(json.loads(line))
        else:
            yield from (block for block in raw.split("\n\n") if block.strip())


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, with ChatML special tokens and template.

    Normalizer and pre-tokenizer are Qwen2.5's (NFC, its split regex, then byte-level), so that loading
    the saved directory as a Qwen2 tokenizer, which rebuilds them, tokenizes exactly as trained.
    """
    from tokenizers import (  # noqa: PLC0415 - slow imports, only when building
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _write_model(out_dir: Path, arch: str, files: Sequence[Path]) -> None:
    import torch  # noqa: PLC0415 - slow imports, only when building
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: PLC0415

    tokenizer = train_tokenizer(sample_texts(files))
    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = getattr(transformers, CONFIG_CLASSES[arch])(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        **MODEL_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, bos_token_id=None
    )
    transformers.utils.logging.disable_progress_bar()  # stderr keeps to plora's own lines
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
