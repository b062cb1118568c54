"""Where the journal goes and what else lives in data_dir: the database schema and reads, the group-commit journal, retention."""
