"""``python -m trimkv ...``: the ``trimkv`` command."""
import sys

from trimkv.cli import main

sys.exit(main())
