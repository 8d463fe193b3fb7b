"""``python -m moe2lib <command> --help``: the command line (:mod:`moe2lib.pipeline.cli`)."""

import sys

from .pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
