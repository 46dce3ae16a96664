"""When two colours are alike: the one colour rule the paste-back's pixel rules share.

The halo (``halo.py``), the subject's outline (``outline.py``), new content (``new_content.py``), the ghost
(``ghost.py``) and the colour match's continuing surface (``compositing.py``) all ask the same question of a pixel:
does its colour continue a surface, or is it unlike every colour found there? :data:`COLOUR_DISTANCE` is where
one surface ends, and :func:`unlike_all` asks the question of many pixels at once.
"""

from __future__ import annotations

import numpy as np
import torch

# RGB distance (0-255 levels) within which a pixel continues a surface. Neighbouring pixels of one surface differ
# by noise and shading (under ~20 in photos and in ShapesWorld's anti-aliasing); a subject's edge against its
# background differs by far more.
COLOUR_DISTANCE = 30.0

#: At most this many colours of a palette are compared (an even pick of them when it has more).
PALETTE_SIZE = 1024


def unlike_all(colours: np.ndarray, palette: np.ndarray, distance: float = COLOUR_DISTANCE) -> np.ndarray:
    """For each of ``colours`` (N×3): whether it is farther than ``distance`` from every colour of ``palette``
    (M×3; at most ``PALETTE_SIZE`` of its distinct colours are used). An empty palette is unlike everything."""
    palette = np.unique(np.asarray(palette, np.float32).reshape(-1, 3), axis=0)
    if len(palette) == 0:
        return np.ones(len(colours), bool)
    palette = torch.from_numpy(palette[np.linspace(0, len(palette) - 1, min(len(palette), PALETTE_SIZE)).astype(int)])
    colours = torch.from_numpy(np.ascontiguousarray(colours, np.float32).reshape(-1, 3))
    nearest = [torch.cdist(part, palette).amin(dim=1) for part in colours.split(4096)]
    return (torch.cat(nearest) > distance).numpy() if nearest else np.zeros(0, bool)
