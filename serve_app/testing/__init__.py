"""What the end-to-end tests, the benchmarks and notebooks share: a server as a child process on
loopback (:mod:`.server`), started through the default entry point and stopped by its pid; the
numbers in its ``/metrics`` (:mod:`.metrics`); and stand-ins for fine-tuned checkpoints
(:mod:`.variants`, numpy only).

Imports nothing of the server but its command line's name: it runs the server, it never loads
it (no Ray, no torch, no HTTP framework here).
"""
