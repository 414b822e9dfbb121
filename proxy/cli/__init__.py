"""The `seekgate` command and its subcommands: thin over the same operations as the admin API."""
