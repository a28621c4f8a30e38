"""Kowalski agent: the daemon that runs sandboxed code jobs on every exo node."""
