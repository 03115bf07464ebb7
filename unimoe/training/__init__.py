"""Lightning training: the three curriculum stages, upcycling, callbacks and the CLI."""
