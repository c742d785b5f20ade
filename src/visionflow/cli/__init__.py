"""The `vflow` command line."""
