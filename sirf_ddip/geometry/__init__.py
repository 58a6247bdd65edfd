"""sirf_ddip.geometry: scanner, sinogram and image geometry (STIR conventions)."""

from .image import ImageGrid
from .scanner import Scanner, get_scanner, scanner_names
from .sinogram import Segment, SinogramGeometry, span_segments

__all__ = ["ImageGrid", "Scanner", "get_scanner", "scanner_names", "Segment", "SinogramGeometry", "span_segments"]
