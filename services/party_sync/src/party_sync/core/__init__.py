"""The pure core: party logic as plain data and functions.

Nothing here awaits, reads the clock or touches a socket: time comes in as ``now`` (seconds) and
decisions come out as return values that the gateway and the backends carry out. The Redis backend
renders the same rules as Lua scripts; the shared behavioural suite keeps the two in step.
"""
