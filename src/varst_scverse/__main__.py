"""``python -m varst_scverse ...`` runs the ``varst`` command line (see :mod:`varst_scverse.cli`)."""

from varst_scverse.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
