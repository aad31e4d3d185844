"""``python -m trimkv.eval eval|plot ...`` (same as ``trimkv eval|plot ...``)."""
import sys

from trimkv.eval.cli import main

sys.exit(main())
