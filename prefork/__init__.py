"""The master side of pgherd: command line, configuration, and the supervising master process.

Nothing in this package speaks the PostgreSQL protocol; it reads configuration, binds the
listeners, forks the workers (``workers/``) and keeps them alive.
"""
