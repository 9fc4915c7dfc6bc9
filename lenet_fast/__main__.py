"""`python -m lenet_fast`: versions, and which backends run here (and why not)."""

from . import available_backends, cli


def main() -> None:
    print("  ".join(f"{k} {v}" for k, v in cli.versions().items() if v))
    for name, entry in available_backends().items():
        where = ", ".join(entry["devices"]) or "unavailable"
        print(f"{name:8} {where:12} {entry['description']}")
        if entry["reason"]:
            print(f"{'':8} {'':12} why not: {entry['reason']}")


main()
