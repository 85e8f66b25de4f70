"""A server as a child process on loopback (:mod:`.server`), for the end-to-end tests, the
benchmarks and notebooks: started through the default entry point, stopped by its pid.

Imports nothing of the server but its command line's name: it runs the server, it never loads
it.
"""
