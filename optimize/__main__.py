"""`python -m optimize <method> key=value ...` (see optimize.cli)."""

from optimize.cli import main

if __name__ == "__main__":
    main()
