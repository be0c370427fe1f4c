"""``make run``'s launcher: ``python -m tasks.launch`` checks what would stop Ferry from starting,
starts supervisord in the foreground with ``config/supervisord.cpu.conf`` and tells a person
what is happening (one line per process as it comes up, then the ready line), with each
process's own output prefixed by its name.

Supervision is supervisord's (restarts, back-off, stopping process groups); this package only
prepares its environment and reports. It speaks to Ferry's processes as anyone outside them
would: over HTTP (``/health``), Redis (the workers' heartbeats) and supervisord's XML-RPC.
"""
