"""`python -m lenet_fast`: versions, and which backends run here (and why not)."""

import argparse
import sys

from . import available_backends, cli


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="lenet_fast",
        description="Print the versions and which backends run here (and why not). The tools are "
                    "python -m lenet_fast.train, lenet_fast.evaluate and lenet_fast.predict.",
    ).parse_args(argv)  # no options: anything given is an error (exit 2), not silently ignored
    print("  ".join(f"{k} {v}" for k, v in cli.versions().items() if v))
    for name, entry in available_backends().items():
        where = ", ".join(entry["devices"]) or "unavailable"
        print(f"{name:8} {where:12} {entry['description']}")
        if entry["reason"]:
            print(f"{'':8} {'':12} why not: {entry['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
