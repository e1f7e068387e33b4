"""``python -m pmod_train {train,routing-map,demo-image}``: see each subcommand's ``--help``."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "pmod_train.train",
    "routing-map": "pmod_train.routing_map",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m pmod_train {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    import importlib.util

    if importlib.util.find_spec("pmod_reference") is None:
        # The wheel ships pmod_train for its checkpoints only (see pmod_train/__init__.py).
        raise SystemExit(f"python -m pmod_train {argv[0]} needs a clone of the repository: it is built on the "
                         "plain-PyTorch reference (pmod_reference), which the pmod-serve wheel does not ship")
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
