"""`python -m ftrain` is the `ftrain` command."""

from ftrain.cli import main

main()
