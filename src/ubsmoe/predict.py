"""``python -m ubsmoe.predict EXPORT_DIR "a sentence" ... [--file FILE]``: labels and scores from an export.

Two-sentence tasks (MRPC, RTE, STS-B, ...) take each example as ``"first ||| second"``.
``--file`` reads one example a line. Output: one JSON object a line (input, label, scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ubsmoe.errors import ConfigError
from ubsmoe.export import load_exported

PAIR_SEPARATOR = "|||"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ubsmoe.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="a directory written by python -m ubsmoe.export")
    parser.add_argument("texts", nargs="*", help=f"examples; pairs as 'first {PAIR_SEPARATOR} second'")
    parser.add_argument("--file", type=Path, help="a text file with one example a line")
    args = parser.parse_args(argv)
    texts = list(args.texts)
    if args.file is not None:
        texts += [line for line in args.file.read_text().splitlines() if line.strip()]
    if not texts:
        parser.error("give at least one example (or --file)")
    try:
        exported = load_exported(args.export_dir)
        inputs = [tuple(p.strip() for p in t.split(PAIR_SEPARATOR)) if PAIR_SEPARATOR in t else t for t in texts]
        for text, result in zip(texts, exported.predict(inputs), strict=True):
            print(json.dumps({"input": text, **result}))
    except ConfigError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
