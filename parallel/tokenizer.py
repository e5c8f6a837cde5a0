"""The tokenizer side of the contract: loading a fast tokenizer, its special tokens, and the chat trunk
that training (chat parallel records) and generation (``--chat``) share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parallel.errors import PloraError
from parallel.layout import Message, SpecialTokens, TokenSequence
from parallel.pretrained import load_pretrained

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def load_tokenizer(path: str | Path, chat_template: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local directory or a hub id (see parallel.pretrained), never remote code.

    ``chat_template`` is a Jinja template file that replaces the tokenizer's own.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415 - slow import, only when tokenizing

    tokenizer = load_pretrained(AutoTokenizer, path, what="tokenizer", trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False):
        raise PloraError(f"{path}: needs a fast (tokenizers-backed) tokenizer with a tokenizer.json")
    if chat_template is not None:
        template_path = Path(chat_template)
        try:
            tokenizer.chat_template = template_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise PloraError(f"{template_path}: cannot read the chat template: {err}") from None
    return tokenizer


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """EOS (required) and BOS, the latter only if the tokenizer starts its default encoding with it."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PloraError(
            f"{tokenizer.name_or_path}: the tokenizer has no EOS token; "
            "the contract ends every branch with one"
        )
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = tokenizer("a")["input_ids"]
        if not ids or ids[0] != bos:
            bos = None
    return SpecialTokens(eos_id=int(eos), bos_id=None if bos is None else int(bos))


def apply_template(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    """The chat template's render of ``messages``; ValueError if the template fails on them."""
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - Jinja raises anything the template author wrote
        raise ValueError(f"the chat template failed on this chat: {err}") from None


def chat_trunk(
    tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = True, lead: str = ""
) -> TokenSequence:
    """The trunk of a chat parallel record and of ``plora generate --chat``: the chat template's
    render of ``messages`` (with the assistant's generation prompt unless a branch opens a turn
    of its own) followed by ``lead``, tokenized without special tokens added. Only the lead is
    trained: it is the assistant's text. Training and generation both take their trunk from here,
    so they see the same ids. ValueError if the template fails on the chat."""
    rendered = apply_template(tokenizer, messages, generation_prompt)
    encoded = tokenizer(rendered + lead, add_special_tokens=False, return_offsets_mapping=bool(lead))
    ids = encoded["input_ids"]
    if not lead:
        return TokenSequence.of(ids, False)
    return TokenSequence.of(ids, [end > len(rendered) for _, end in encoded["offset_mapping"]])
