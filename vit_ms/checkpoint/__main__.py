"""`python -m vit_ms.checkpoint list`: the named model zoo; `... formats`: the naming schemes it reads."""
import sys

from ..cli import ArgumentParser


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m vit_ms.checkpoint", description=__doc__)
    parser.add_argument("command", choices=("list", "formats"),
                        help="list: the named pretrained weights; formats: the weight naming schemes")
    args = parser.parse_args(argv)
    if args.command == "list":
        from .zoo import zoo_table

        print(zoo_table())
    else:
        from .formats import FORMATS

        print("| scheme | what it is | detected by | export |\n|---|---|---|---|")
        for name, fmt in FORMATS.items():
            print(f"| {name} | {fmt.description} | {fmt.detected_by} | {'yes' if fmt.export else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
