"""The sweep study's commands: sweep, report, plot, compare."""
