"""Scipion protocols of sort3ddepth."""

from .protocol_sort3d_depth import ProtSort3DDepth

__all__ = ["ProtSort3DDepth"]
