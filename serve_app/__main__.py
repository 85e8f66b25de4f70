"""``python -m serve_app``: the command line (:mod:`serve_app.launch.cli`)."""

import sys

from serve_app.env import without_dataframes

if __name__ == "__main__":
    without_dataframes()  # this process is the server's: before Ray or Ray Serve import them
    from serve_app.launch.cli import main

    sys.exit(main())
