"""What crosses process boundaries: the shared-memory segment and the control channels.

Knows ids and counters, never SQL or pools beyond that.
"""
