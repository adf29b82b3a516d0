import sys

from .toolstack.cli import main

sys.exit(main())
