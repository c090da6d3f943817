"""`python -m segnet.data check ROOT`: list every problem in a data_road folder at once."""

import argparse
import sys

from segnet.data import check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segnet.data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="count images per category and report every problem").add_argument("root")
    args = ap.parse_args(argv)
    counts, problems = check(args.root)
    for split, cats in counts.items():
        print(f"{split}: " + ", ".join(f"{cat} {n}" for cat, n in sorted(cats.items())))
    for p in problems:
        print(f"problem: {p}")
    print(f"{len(problems)} problem(s) in {args.root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
