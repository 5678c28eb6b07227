"""One module per `scaleplan` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
