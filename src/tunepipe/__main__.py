"""`python -m tunepipe` is the `tunepipe` command."""

from .cli import main

main()
