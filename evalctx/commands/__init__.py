"""The ``evalctx`` subcommands that live in their own module (each has ``add_parser`` and ``main``; ``cli.py``
wires them), and :mod:`.argtypes`, the argparse value types they share."""
