"""Per-key counters one process (or the workers' supervisor) holds: the limiter, local and shared."""
