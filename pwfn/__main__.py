"""``python -m pwfn``: the same command line as the ``pwfn`` script."""

from pwfn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
