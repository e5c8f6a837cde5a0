"""Packing a whole list of tokenized records at once, for the tests (the library streams them through
:class:`parallel.layout.Packer`, shard by shard)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from parallel.layout import PackedRow, Packer, PackingOptions, PackItem, SpecialTokens


def pack_rows(
    items: Iterable[PackItem], options: PackingOptions, special: SpecialTokens
) -> Iterator[PackedRow]:
    """Pack tokenized records into rows per the contract (see :class:`Packer`)."""
    packer = Packer(options, special)
    for item in items:
        yield from packer.add(item)
    yield from packer.finish()
