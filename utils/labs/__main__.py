"""``python -m utils.labs generate|grade|gradescope ...``: one entry point for the lab system's
commands."""

import importlib
import sys

COMMANDS = {"generate": "utils.labs.generate", "grade": "utils.labs.grade",
            "gradescope": "utils.labs.gradescope"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m utils.labs {{{'|'.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
