"""The worker side of pgherd: one gevent hub per process running the whole pooler core.

Protocol framing (``proto``), client and server connections, pools and pool modes,
authentication and the admin console all live here.
"""
