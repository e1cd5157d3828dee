"""The ``ggq`` command line: one click group, one small function per subcommand.

Each subcommand only parses options and calls into the module that does the work; a
:class:`ggq.errors.GGQError` from there becomes ``ggq: error: <message>`` and exit status 1.
"""

from __future__ import annotations

import sys

import click

from ggq import __version__
from ggq.errors import GGQError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GGQError as e:
            click.echo(f"ggq: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("ggq: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ggq")
def main():
    """Convert Hugging Face checkpoints to GGUF and run GGUF models on a CPU."""


# ---------------------------------------------------------------- convert / info (format, conversion)

@main.command()
@click.argument("src")
@click.option("-o", "--outfile", "out", type=click.Path(dir_okay=False), default=None,
              help="Output GGUF path (default: <model name>-<TYPE>.gguf in the current folder).")
@click.option("--type", "qtype", default=None, metavar="TYPE",
              help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (default: the checkpoint's own float type).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert(src, out, qtype, force):
    """Convert a Hugging Face checkpoint (folder or hub id) to a GGUF file."""
    from ggq.convert.pipeline import convert as run_convert

    path = run_convert(src, out, qtype=qtype, force=force, progress=True)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--all-metadata", is_flag=True, help="Print long arrays (vocabularies) in full.")
def info(file, all_metadata):
    """Print a GGUF file's metadata, tensor table, bits per weight and size."""
    from ggq.format.info import format_info

    click.echo(format_info(file, full_arrays=all_metadata))


if __name__ == "__main__":
    main()
