"""One module per ``unimoe`` subcommand, each exposing ``main(argv) -> int``."""
