"""kowalski-ctl: the command line, and the one-machine local mode."""
