"""Command-line option types shared by ``nodulemtl analyze`` / ``batch`` (:mod:`.cli`) and
``nodulemtl pacs`` (:mod:`.pacs`), so that neither command module imports the other."""

from __future__ import annotations

import argparse


def threshold_arg(text: str):
    """argparse type of ``--threshold``: 'default', 'adaptive' or a float in [0, 1]
    (:func:`NoduleMTLLib.detection.infer.parse_threshold`).

    Raises:
        argparse.ArgumentTypeError: anything else (argparse prints it as a usage error, exit 2).
    """
    from ..detection.infer import parse_threshold

    try:
        return parse_threshold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
