"""``python -m serve_app``: the command line (:mod:`serve_app.launch.cli`)."""

import sys

from serve_app.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
