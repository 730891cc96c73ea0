"""Entry points (the `hdb` CLI and its subcommands): thin wiring around the library."""
