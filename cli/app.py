"""The Typer application every command module registers on."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperCommand


def _is_alias(opt: str) -> bool:
    """The original guide's underscore spellings (``--base_model``), accepted beside ``--base-model``."""
    return opt.startswith("--") and "_" in opt


@contextmanager
def _readable_options(params: list[Any]) -> Iterator[None]:
    """For the help only: no underscore aliases (the table cut the option names short to fit them)
    and no type for on/off flags (every flag showed ``<bool>``). Parsing never sees this."""
    saved = [(p, p.opts, p.secondary_opts, p.metavar) for p in params]
    for p in params:
        p.opts = [o for o in p.opts if not _is_alias(o)]
        p.secondary_opts = [o for o in p.secondary_opts if not _is_alias(o)]
        if getattr(p, "is_flag", False):
            p.metavar = ""
    try:
        yield
    finally:
        for p, opts, secondary_opts, metavar in saved:
            p.opts, p.secondary_opts, p.metavar = opts, secondary_opts, metavar


class PloraCommand(TyperCommand):
    """A command whose ``--help`` lists each option once, by its plora name, and the guide's
    spellings it also accepts in one line at the end."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        params = self.get_params(ctx)  # with --help
        aliases = [o for p in params for o in (*p.opts, *p.secondary_opts) if _is_alias(o)]
        epilog = self.epilog
        if aliases:
            self.epilog = f"The original guide's spellings work too: {', '.join(aliases)}."
        try:
            with _readable_options(params):
                super().format_help(ctx, formatter)
        finally:
            self.epilog = epilog


class PloraTyper(typer.Typer):
    """Every command registered here is a :class:`PloraCommand`."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", PloraCommand)
        return super().command(*args, **kwargs)


app = PloraTyper(
    name="plora",
    help="Teach a causal LM to read and write several branches of text in parallel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
