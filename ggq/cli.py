"""The ``ggq`` command line: one click group, one small function per subcommand.

Each subcommand only parses options and calls into the module that does the work; a
:class:`ggq.errors.GGQError` from there becomes ``ggq: error: <message>`` and exit status 1.
"""

from __future__ import annotations

import os
import sys

import click

from ggq import __version__
from ggq.errors import GGQError, one_line


#: exit status of an internal error (a bug in ggq; BSD's EX_SOFTWARE), distinct from bad input (1)
EXIT_INTERNAL = 70


class _Group(click.Group):
    """The top-level handler: no traceback reaches the user. Bad input (:class:`GGQError`) and
    operating-system errors (missing file, disk full, read-only folder) are ``ggq: error: ...``,
    exit status 1; Ctrl-C is ``ggq: interrupted``, 130; anything else is a bug in ggq, reported as
    one ``ggq: internal error: ...`` line, exit status 70. Every message is one printable line
    (:func:`ggq.errors.one_line`)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GGQError as e:
            _die(f"ggq: error: {one_line(str(e))}", 1)
        except KeyboardInterrupt:
            _die("ggq: interrupted", 130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # the reader of our output went away (ggq info | head)
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            sys.exit(1)
        except MemoryError:
            _die("ggq: error: out of memory", 1)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _die(f"ggq: error: {one_line(where + (e.strerror or str(e)))}", 1)
        except Exception as e:  # a bug: one line, never a traceback
            _die(f"ggq: internal error: {one_line(f'{type(e).__name__}: {e}', 300)} (please report this)",
                 EXIT_INTERNAL)


def _die(message: str, status: int) -> None:
    try:
        click.echo(message, err=True)
    finally:
        sys.exit(status)


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
@click.option("--import-report", type=click.Path(dir_okay=False), default=None,
              help="Quantized checkpoints: write each tensor's error against the checkpoint's own dequantization (TSV).")
@click.option("--lora", "loras", multiple=True, metavar="ADAPTER[:SCALE]",
              help="Merge a LoRA adapter (PEFT folder or GGUF adapter) into the weights before quantizing: "
                   "W += SCALE * alpha/r * B @ A in float32 (repeatable; SCALE default 1).")
def convert(src, out, qtype, force, output_tensor_type, token_embedding_type, tensor_types, imatrix, allow_requantize,
            import_report, loras):
    """Convert a Hugging Face checkpoint (folder or hub id), or a GGUF file, to a GGUF file."""
    from ggq.convert.pipeline import convert as run_convert

    overrides = _overrides(output_tensor_type, token_embedding_type, tensor_types)
    path = run_convert(src, out, qtype=qtype, force=force, progress=True, overrides=overrides, imatrix=imatrix,
                       allow_requantize=allow_requantize, import_report=import_report, loras=list(loras))
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


@main.command("convert-lora")
@click.argument("adapter_dir", type=click.Path(file_okay=False))
@click.option("--base", default=None, metavar="BASE",
              help="The base model's Hugging Face checkpoint (folder or hub id; its config and tensor names are "
                   "used). Default: adapter_config.json's base_model_name_or_path.")
@click.option("-o", "--outfile", "out", type=click.Path(dir_okay=False), default=None,
              help="Output GGUF path (default: <adapter folder>-<OUTTYPE>.gguf in the current folder).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False), default="f16",
              show_default=True, help="Type of the lora_a/lora_b tensors (q8_0 where rows allow, else f16).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert_lora(adapter_dir, base, out, outtype, force):
    """Convert a PEFT LoRA adapter folder to llama.cpp's GGUF LoRA format (ggq/llama.cpp --lora FILE)."""
    from ggq.convert.lora import convert_lora as run

    path = run(adapter_dir, base, out, outtype, force=force)
    click.echo(f"wrote {path}")


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("qtype", metavar="TYPE")
@click.option("--allow-requantize", is_flag=True, help="Allow tensors that are already quantized (their error adds up).")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="Importance matrix (llama.cpp imatrix .gguf or legacy .dat).")
@click.option("--output-tensor-type", default=None, metavar="TYPE", help="ggml type for output.weight.")
@click.option("--token-embedding-type", default=None, metavar="TYPE", help="ggml type for token_embd.weight.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="ggml type for tensors whose name matches the regex PATTERN (repeatable), e.g. attn_v=q8_0.")
@click.option("--pure", is_flag=True, help="No mix rules: every quantizable tensor in TYPE's default type.")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight as it is.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def quantize(src, out, qtype, allow_requantize, imatrix, output_tensor_type, token_embedding_type, tensor_types,
             pure, leave_output_tensor, force, quiet):
    """Requantize a GGUF file to TYPE (llama-quantize's argument order).

    TYPE: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K
    (Q3_K = Q3_K_M, Q4_K = Q4_K_M, Q5_K = Q5_K_M), with llama.cpp's per-tensor mix rules.
    """
    from ggq.convert.mixes import MixOverrides, parse_file_type
    from ggq.convert.requantize import requantize

    ftype = parse_file_type(qtype)  # fail fast on a bad TYPE
    ov = MixOverrides.parse(output_tensor_type, token_embedding_type, tensor_types)
    ov.pure, ov.leave_output_tensor = pure, leave_output_tensor
    path = requantize(src, out, ftype, allow_requantize=allow_requantize, overrides=ov, imatrix=imatrix,
                      force=force, progress=not quiet)
    click.echo(f"wrote {path}")


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-f", "--text", "text", type=click.Path(dir_okay=False, exists=False), required=True,
              help="Calibration text file (UTF-8).")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default="imatrix.gguf", show_default=True,
              help="Output imatrix file (llama.cpp's GGUF imatrix format).")
@click.option("-c", "--ctx", "ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, default=None, help="Use at most N chunks (default: all).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def imatrix(model, text, out, ctx, chunks, force, quiet):
    """Collect an importance matrix (mean squared input activations of every matmul weight).

    MODEL: a Hugging Face checkpoint folder (or hub id) or a GGUF file; the forward passes run in
    transformers (PyTorch, CPU). Use the result with `ggq quantize --imatrix` or `ggq convert --imatrix`.
    """
    from ggq.convert.imatrix import collect_imatrix

    path = collect_imatrix(model, text, out, ctx=ctx, chunks=chunks, force=force, progress=not quiet)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--all-metadata", is_flag=True, help="Print long arrays (vocabularies) in full.")
def info(file, all_metadata):
    """Print a GGUF file's metadata, tensor table, bits per weight and size."""
    from ggq.format.info import format_info

    click.echo(format_info(file, full_arrays=all_metadata))


# ---------------------------------------------------------------- run / generate (runtime chat)

_CACHE_TYPE = click.option(
    "--cache-type", "cache_type", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
    help="KV cache element type (llama.cpp's -ctk/-ctv; f32 is exact, f16 half the memory).")


_LORA_OPTIONS = [
    click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                 help="GGUF LoRA adapter merged into the weights at load (repeatable; SCALE default 1)."),
    click.option("--lora-type", "lora_type", type=click.Choice(["same", "f32", "f16", "q8_0"]), default="same",
                 show_default=True,
                 help="Type of the tensors an adapter changes: the base tensor's (quantized ones requantized), "
                      "or f32 (exact), f16, q8_0 (less error than requantizing a 4-bit base)."),
]


def _lora_specs(loras) -> list[tuple[str, float]]:
    from ggq.convert.lora import parse_lora_spec

    return [parse_lora_spec(s) for s in loras]


def _sampling_options(f):
    """Sampling and runtime options shared by ``run`` and ``generate`` (llama.cpp's names and defaults)."""
    opts = [
        click.option("-c", "--ctx-size", "ctx_size", type=int, default=None,
                     help="Context size in tokens (default: the runtime's, like llama.cpp's 4096)."),
        click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)."),
        _CACHE_TYPE,
        click.option("-n", "--n-predict", "n_predict", type=int, default=-1, show_default=True,
                     help="Tokens to generate per reply (-1: until end of turn or a full context)."),
        click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature (0: greedy)."),
        click.option("--top-k", type=int, default=40, show_default=True, help="Top-k (0: off)."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="Top-p (1.0: off)."),
        click.option("--min-p", type=float, default=0.05, show_default=True, help="Min-p (0.0: off)."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                     help="Repeat penalty (1.0: off)."),
        click.option("--repeat-last-n", type=int, default=64, show_default=True,
                     help="Tokens the repeat penalty looks back over (0: off, -1: the whole context)."),
        click.option("--seed", type=int, default=-1, show_default=True, help="Random seed (-1: random)."),
        click.option("-v", "--verbose", is_flag=True, help="Print prompt/generation speed after each reply."),
        click.option("--no-think", "no_think", is_flag=True,
                     help="Thinking models (Qwen 3): answer without thinking (enable_thinking=false)."),
        click.option("--hide-think", "hide_think", is_flag=True,
                     help="Do not print a reply's <think> block (shown dimmed on a terminal otherwise)."),
        *_LORA_OPTIONS,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _sampler_params(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed):
    from ggq.runtime.sampler import SamplerParams

    return SamplerParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                         repeat_last_n=repeat_last_n, seed=None if seed < 0 else seed)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-s", "--system", default=None, help="System prompt.")
@_sampling_options
def run(model, system, ctx_size, threads, cache_type, n_predict, temp, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed, verbose, no_think, hide_think, loras, lora_type):
    """Chat with a GGUF model (default: SmolLM2-135M-Instruct, fetched on first use).

    Type a message and press Enter; /reset clears the conversation, /exit or Ctrl-D quits,
    Ctrl-C stops a reply.
    """
    from ggq.runtime.chat import run_chat

    if model is None:
        from ggq.runtime.default_model import default_model_path

        model = str(default_model_path())
    run_chat(model, _sampler_params(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed),
             system=system, n_predict=n_predict, n_ctx=ctx_size, n_threads=threads, verbose=verbose,
             kv_type=cache_type, no_think=no_think, hide_think=hide_think, loras=_lora_specs(loras),
             lora_type=lora_type)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", default=None, help="Prompt text (default: read from standard input).")
@click.option("--chat", is_flag=True, help="Apply the model's chat template (the prompt is one user message).")
@click.option("-s", "--system", default=None, help="System prompt (with --chat).")
@_sampling_options
def generate(model, prompt, chat, system, ctx_size, threads, cache_type, n_predict, temp, top_k, top_p, min_p,
             repeat_penalty, repeat_last_n, seed, verbose, no_think, hide_think, loras, lora_type):
    """Print the continuation of a prompt (for scripts and pipes).

    The prompt is -p's text, else standard input (one trailing newline dropped). The raw text is
    continued; --chat sends it as a user message through the model's chat template instead.
    """
    from ggq.runtime.chat import run_generate

    if prompt is None:
        if sys.stdin.isatty():
            click.echo("ggq: reading the prompt from standard input (end it with Ctrl-D)", err=True)
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):  # the newline `echo` adds is not part of the prompt
            prompt = prompt[:-1]
    run_generate(model, prompt, _sampler_params(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed),
                 n_predict=n_predict, chat=chat, system=system, n_ctx=ctx_size, n_threads=threads, verbose=verbose,
                 kv_type=cache_type, no_think=no_think, hide_think=hide_think, loras=_lora_specs(loras),
                 lora_type=lora_type)


# ---------------------------------------------------------------- serve (OpenAI-compatible server)

@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port.")
@click.option("-np", "--parallel", type=int, default=4, show_default=True,
              help="Slots: requests decoded together, one KV cache of --ctx-size tokens each.")
@click.option("-c", "--ctx-size", "ctx_size", type=int, default=None,
              help="Context size in tokens per slot (default: the runtime's, like llama.cpp's 4096).")
@click.option("--queue-size", "queue_size", type=int, default=64, show_default=True,
              help="Requests that may wait for a free slot; beyond them: 503 with Retry-After.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")
@click.option("--alias", default=None, help="Model id the API reports (default: the file name).")
@_CACHE_TYPE
@_LORA_OPTIONS[0]
@_LORA_OPTIONS[1]
def serve(model, host, port, parallel, ctx_size, queue_size, threads, api_key, alias, cache_type, loras, lora_type):
    """Serve a GGUF model over an OpenAI-compatible HTTP API (default model: SmolLM2-135M-Instruct).

    Endpoints: /v1/chat/completions, /v1/completions (streaming too), /v1/models, /health,
    /tokenize, /detokenize. One log line per request on standard error; Ctrl-C stops.
    """
    from ggq.serve.app import serve as run_serve

    if model is None:
        from ggq.runtime.default_model import default_model_path

        model = str(default_model_path())
    run_serve(model, host=host, port=port, n_slots=parallel, n_ctx=ctx_size, n_threads=threads, api_key=api_key,
              alias=alias, kv_type=cache_type, max_queue=queue_size, loras=_lora_specs(loras), lora_type=lora_type)


# ---------------------------------------------------------------- perplexity (quality)

@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-f", "--text", "text", type=click.Path(dir_okay=False), default=None,
              help="Text file to score (e.g. wikitext-2-raw/wiki.test.raw); not needed with --kl-base.")
@click.option("-c", "--ctx", "ctx", type=int, default=None, help="Tokens per chunk (default 512; with --kl-base: the file's).")
@click.option("--chunks", type=int, default=None, help="Score only the first N chunks (default: all).")
@click.option("-b", "--batch", type=int, default=None, help="Tokens per evaluation call (default: --ctx).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--save-logits", type=click.Path(dir_okay=False), default=None,
              help="Store this (reference) model's log-probabilities for a later --kl-base run.")
@click.option("--kl-base", type=click.Path(dir_okay=False), default=None,
              help="KL divergence against a --save-logits file (scores that file's tokens).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def perplexity(model, text, ctx, chunks, batch, threads, save_logits, kl_base, quiet):
    """Perplexity of MODEL on a text, llama-perplexity's method (second half of each chunk scored)."""
    from ggq.perplexity import run as run_ppl

    if kl_base and text:
        click.echo("ggq: note: --text is ignored with --kl-base (the logits file holds the tokens)", err=True)
    if kl_base and save_logits:
        raise GGQError("--save-logits and --kl-base cannot be used together")
    res = run_ppl(model, None if kl_base else text, n_ctx=ctx, n_chunks=chunks, n_batch=batch, n_threads=threads,
                  save_logits=save_logits, kl_base=kl_base, progress=not quiet)
    click.echo(res.report())
    if save_logits:
        click.echo(f"wrote {save_logits}")


# ---------------------------------------------------------------- bench (runtime speed)

@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-p", "--n-prompt", type=int, default=128, show_default=True, help="Prompt tokens (one batch).")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Decoded tokens.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("-r", "--repetitions", type=int, default=3, show_default=True, help="Timed runs per test (median).")
@_CACHE_TYPE
def bench(model, n_prompt, n_gen, threads, repetitions, cache_type):
    """Prompt and decode tokens/s of MODEL, like llama-bench."""
    from ggq.runtime.bench import run_bench

    click.echo(run_bench(model, n_prompt, n_gen, threads, repetitions, kv_type=cache_type))


if __name__ == "__main__":
    main()
