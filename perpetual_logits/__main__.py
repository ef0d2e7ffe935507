"""``python -m perpetual_logits``: the ``perpetual-logits`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
