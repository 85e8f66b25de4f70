"""``python -m serve_app``: the command line (:mod:`serve_app.launch.cli`)."""

import sys

from serve_app.env import without_pandas

if __name__ == "__main__":
    without_pandas()  # this process is the server's: before anything imports Ray Serve
    from serve_app.launch.cli import main

    sys.exit(main())
