"""``python -m asif``: the ``asif`` command."""
import sys

from asif.cli import main

sys.exit(main())
