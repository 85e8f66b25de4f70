"""Starting and stopping: the command line (``python -m serve_app``, :mod:`.cli`), the
launcher that starts Ray in Serve's high-throughput mode, deploys and drains
(:mod:`.lifecycle`), and what a killed server leaves running, HAProxy's wrapper included
(:mod:`.leftovers`).

Imports the config and Ray (at run time, in :mod:`.lifecycle`), never the serving layers: the
application is built inside the cluster, so this process never imports torch.
"""
