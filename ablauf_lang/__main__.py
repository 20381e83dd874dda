"""`python -m ablauf_lang ...`: the same as the `ablauf` command."""

from ablauf_lang.cli import main

if __name__ == "__main__":
    main()
