"""`otactl`: the command line, and the commands that work on files (package add, plan, backup and restore)."""
