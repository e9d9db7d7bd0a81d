"""The user-facing model class (AnnData in, AnnData out)."""

from ._varst import VARST

__all__ = ["VARST"]
