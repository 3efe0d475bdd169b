"""One module per sub-command: ``add_parser(subparsers)`` sets ``func``."""
