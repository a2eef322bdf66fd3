"""Contender servers. Each module is started as ``python -m benchmarks.servers.<name>`` and prints one
line ``READY {json}`` on stdout (ports, paths, the client dialect) once it accepts connections."""
