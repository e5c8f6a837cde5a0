"""The Typer application every command module registers on."""

import typer

app = typer.Typer(
    name="plora",
    help="Teach a causal LM to read and write several branches of text in parallel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
