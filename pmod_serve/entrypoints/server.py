"""`pmod-serve`: vLLM's OpenAI-compatible server with p-MoD defaults.

    pmod-serve <checkpoint> [any vllm serve flag ...]     (the checkpoint comes first)
    pmod-serve --demo [--port 8000]        # serves the trained tiny checkpoint (pmod_train) on CPU

It is `vllm serve` (the plugin is loaded through its entry point either way) plus defaults:
  - the registry's `vicuna_v1` chat template when the checkpoint has none (plain `vllm serve`
    gets it too, through the plugin's fallback registration);
  - `--limit-mm-per-prompt {"image": 4}`;
  - `--shutdown-timeout 30`: on SIGTERM, stop accepting and drain in-flight requests for up to 30 s;
  - options to loosen the media checks that the plugin applies to p-MoD models under plain
    `vllm serve` too (`pmod_serve.multimodal.media_connector`: loopback/private addresses refused unless
    `--media-allow-host` allows them, size cap, no redirects, image header checks);
    `--media-allowed-domain` and `--media-timeout` are spelled as vLLM's own
    `--allowed-media-domains` and `VLLM_IMAGE_FETCH_TIMEOUT`.
Every flag not listed under "pmod-serve options" goes to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

DEFAULT_IMAGE_LIMIT = 4
DEFAULT_SHUTDOWN_TIMEOUT = 30
def build_demo_checkpoint() -> Path:
    """The demo model: the tiny p-MoD checkpoint trained on the shapes task (`pmod_train`, committed
    in pmod_train/checkpoints/shapes-pmod), served as is."""
    from pmod_train.paths import PMOD_CHECKPOINT

    if not (PMOD_CHECKPOINT / "config.json").is_file():
        raise SystemExit(f"pmod-serve --demo: the trained demo checkpoint is missing ({PMOD_CHECKPOINT}); "
                         "rebuild it with `python -m pmod_train train --out " + str(PMOD_CHECKPOINT) + "`")
    return PMOD_CHECKPOINT


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def vllm_args(checkpoint: str | None, passthrough: list[str], demo: bool,
              allowed_media_domains: list[str] | None = None) -> list[str]:
    """The full `vllm serve` argument list: ours where the user gave none."""
    args = list(passthrough)
    if allowed_media_domains:
        args += ["--allowed-media-domains", *allowed_media_domains]
    if checkpoint is not None:
        args = ["--model", checkpoint, *args]
    defaults: list[tuple[str, str | None]] = [
        ("--limit-mm-per-prompt", f'{{"image": {DEFAULT_IMAGE_LIMIT}}}'),
        # SIGTERM drains in-flight requests for up to this long (vLLM's default, 0, aborts them).
        ("--shutdown-timeout", str(DEFAULT_SHUTDOWN_TIMEOUT)),
    ]
    if demo:
        defaults += [("--host", "127.0.0.1"), ("--port", "8000"), ("--max-model-len", "4096"),
                     ("--served-model-name", "pmod-tiny"), ("--dtype", "float32")]
    for flag, value in defaults:
        if not _has_flag(args, flag):
            args += [flag, value] if value is not None else [flag]
    return args


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="pmod-serve",
        description="Serve a p-MoD checkpoint with vLLM (OpenAI-compatible). "
        "Unknown flags are passed to vLLM.",
    )
    group = parser.add_argument_group("pmod-serve options")
    group.add_argument("--demo", action="store_true", help="serve the tiny demo checkpoint on CPU")
    group.add_argument("--media-allow-host", action="append", default=[], metavar="HOST|CIDR",
                       help="allow image URLs on this non-public host/network (repeatable; '*' = any)")
    group.add_argument("--media-allowed-domain", action="append", default=[], metavar="DOMAIN",
                       help="only fetch image URLs from these hosts (repeatable; vLLM's --allowed-media-domains)")
    group.add_argument("--media-max-bytes", type=int, default=None, help="size cap per fetched image")
    group.add_argument("--media-timeout", type=float, default=None,
                       help="seconds per image fetch (vLLM's VLLM_IMAGE_FETCH_TIMEOUT, whole seconds)")
    # Like `vllm serve <model>`: the checkpoint, if given, comes first. (A positional argparse
    # argument would swallow the values of unknown vLLM flags.)
    checkpoint = argv[0] if argv and not argv[0].startswith("-") else None
    options, passthrough = parser.parse_known_args(argv[1:] if checkpoint else argv)
    options.checkpoint = checkpoint
    return options, passthrough


def main(argv: list[str] | None = None) -> None:
    options, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    if options.demo == (options.checkpoint is not None) and not _has_flag(passthrough, "--model"):
        raise SystemExit("pmod-serve: give a checkpoint or --demo")

    env = {
        "PMOD_MEDIA_ALLOW_HOSTS": ",".join(options.media_allow_host),
        "PMOD_MEDIA_MAX_BYTES": "" if options.media_max_bytes is None else str(options.media_max_bytes),
        "VLLM_IMAGE_FETCH_TIMEOUT": "" if options.media_timeout is None else str(max(1, math.ceil(options.media_timeout))),
    }
    os.environ.update({k: v for k, v in env.items() if v})
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    checkpoint = options.checkpoint
    if options.demo:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
        checkpoint = str(build_demo_checkpoint())
    run_vllm_server(vllm_args(checkpoint, passthrough, options.demo, options.media_allowed_domain))


def run_vllm_server(args: list[str]) -> None:
    """Exactly what `python -m vllm.entrypoints.openai.api_server` does with these arguments."""
    import uvloop
    from vllm.entrypoints.openai.api_server import run_server
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description="pmod-serve (vLLM OpenAI-compatible server)"))
    parsed = parser.parse_args(args)
    validate_parsed_serve_args(parsed)
    uvloop.run(run_server(parsed))


if __name__ == "__main__":
    main()
