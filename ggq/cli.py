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
              help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K "
                   "(Q4_K = Q4_K_M, ...). Default: the checkpoint's own float type.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--output-tensor-type", default=None, metavar="TYPE", help="ggml type for output.weight.")
@click.option("--token-embedding-type", default=None, metavar="TYPE", help="ggml type for token_embd.weight.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="ggml type for tensors whose name matches the regex PATTERN (repeatable).")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None, help="Importance matrix (llama.cpp imatrix .gguf or .dat).")
@click.option("--allow-requantize", is_flag=True, help="Allow a quantized GGUF input (its error adds up).")
def convert(src, out, qtype, force, output_tensor_type, token_embedding_type, tensor_types, imatrix, allow_requantize):
    """Convert a Hugging Face checkpoint (folder or hub id), or a GGUF file, to a GGUF file."""
    from ggq.convert.pipeline import convert as run_convert

    overrides = _overrides(output_tensor_type, token_embedding_type, tensor_types)
    path = run_convert(src, out, qtype=qtype, force=force, progress=True, overrides=overrides, imatrix=imatrix,
                       allow_requantize=allow_requantize)
    click.echo(f"wrote {path}")


def _overrides(output_tensor_type, token_embedding_type, tensor_types):
    """llama-quantize style per-tensor overrides, or None when none are given."""
    if not (output_tensor_type or token_embedding_type or tensor_types):
        return None
    from ggq.convert.mixes import MixOverrides
    from ggq.quants import parse_ggml_type

    pairs = []
    for spec in tensor_types:
        if "=" not in spec:
            raise GGQError(f"--tensor-type {spec!r}: expected PATTERN=TYPE")
        pat, t = spec.rsplit("=", 1)
        pairs.append((pat, parse_ggml_type(t)))
    return MixOverrides(
        output_tensor_type=parse_ggml_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=parse_ggml_type(token_embedding_type) if token_embedding_type else None,
        tensor_types=pairs,
    )


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--all-metadata", is_flag=True, help="Print long arrays (vocabularies) in full.")
def info(file, all_metadata):
    """Print a GGUF file's metadata, tensor table, bits per weight and size."""
    from ggq.format.info import format_info

    click.echo(format_info(file, full_arrays=all_metadata))


if __name__ == "__main__":
    main()
