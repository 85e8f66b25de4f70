"""Starting and stopping: the command line (``python -m serve_app``, :mod:`.cli`), the
launcher that starts Ray in Serve's high-throughput mode, deploys and drains
(:mod:`.lifecycle`), HAProxy's wrapper that dies with its Ray worker (:mod:`.haproxy`), and
stopping what a killed server left running (:mod:`.orphans`).

Imports the config and Ray (at run time, in :mod:`.lifecycle`), never the serving layers: the
application is built inside the cluster, so this process never imports torch.
"""
