"""``python src/train.py experiment=glue_hetero [key=value ...]``: the same as ``python -m ubsmoe.train``."""

from __future__ import annotations

from ubsmoe.train import main

if __name__ == "__main__":
    main()
