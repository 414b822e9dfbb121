"""The audit log: the writer, the JSONL file, the SQLite index."""
