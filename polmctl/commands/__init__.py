"""The logic of the run-management and export commands of ``polmctl`` (cli.py registers them)."""
