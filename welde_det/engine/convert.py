"""Conversion entry point: source archive/folder -> COCO dataset (+ YOLO export), used by tools/convert.py.

``run_convert(kind, source, out_dir, **options)`` resolves the de-identification key,
dispatches to the converter of ``kind`` and returns its
:class:`~welde_det.datasets.sources.common.ConversionResult`:

========  ==========================================================  =====================
kind      source                                                      converter
========  ==========================================================  =====================
yolo      YOLO folder / data.yaml (public six-class lumbar set)       ``convert_yolo_dir``
rsna      RSNA 2024 lumbar archive root                               ``convert_rsna_lsdc``
masks     folder with ``images/`` and ``masks/`` NIfTI volumes        ``convert_masks``
boxes     CSV/JSON table of boxes per volume and slice                ``convert_boxes_table``
========  ==========================================================  =====================

``export_yolo`` turns existing COCO split files into a YOLO folder with ``data.yaml``.

The key is never stored in the dataset: it comes from ``key``, a ``key_file`` outside the
output folder, the ``WELDE_DEID_KEY`` environment variable, or — on a first run with none of
these — the user's own key file, created with a random key in the user's configuration
directory (:func:`welde_det.io.deid.default_key_path`, mode 0600); the log says which.

One process writes an output folder at a time: every converter (and :func:`export_yolo`)
holds an exclusive lock on ``OUT`` (file ``OUT.lock`` beside it, released when the process
ends however it ends) while it stages and moves the result into place; a second one fails at
once with :class:`~welde_det.utils.locking.OutputLockedError` naming the holder. Staging
folders (``.OUT.*.staging``) left by a conversion that died are removed by the next one into
the same ``OUT``; a live process's are never touched.

The output layout (``annotations.json``, ``splits/{train,val,test}.json``, ``images/``) is
read as is by :func:`welde_det.datasets.resolve.resolve_data` (kind ``convert``), for every
framework, with or without ``--yolo``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["CONVERTER_KINDS", "KEY_ENV", "export_yolo", "get_converter", "resolve_key", "run_convert"]

logger = logging.getLogger(__name__)

#: Environment variable holding the de-identification key (read by :func:`welde_det.io.deid.load_key`).
KEY_ENV = "WELDE_DEID_KEY"
CONVERTER_KINDS: tuple[str, ...] = ("yolo", "rsna", "masks", "boxes")


def resolve_key(
    key: str | bytes | None = None,
    key_file: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    create: bool = True,
) -> bytes:
    """The de-identification key: ``key``, else ``key_file``, else ``$WELDE_DEID_KEY``, else
    the user's key file, created with a random key on first use (logged with its path).

    Raises:
        ValueError: an empty key, a missing key file, a key file inside ``out_dir`` (the key
            must stay outside the dataset it protects), or no key with ``create=False``.
    """
    from welde_det.io.deid import obtain_key

    found = obtain_key(key, key_file, dataset_root=out_dir, create=create)
    if found.origin == "created":
        logger.warning(found.describe())
    else:
        logger.info(found.describe())
    return found.key


def get_converter(kind: str) -> Callable[..., Any]:
    """The converter function for ``kind`` (see the module table)."""
    if kind == "yolo":
        from welde_det.datasets.sources.yolo_dir import convert_yolo_dir

        return convert_yolo_dir
    if kind == "rsna":
        from welde_det.datasets.sources.rsna_lsdc import convert_rsna_lsdc

        return convert_rsna_lsdc
    if kind == "masks":
        from welde_det.datasets.sources.masks import convert_masks

        return convert_masks
    if kind == "boxes":
        from welde_det.datasets.sources.boxes_csv import convert_boxes_table

        return convert_boxes_table
    raise ValueError(f"unknown converter {kind!r}; choose one of {list(CONVERTER_KINDS)}")


def run_convert(
    kind: str,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    key: str | bytes | None = None,
    key_file: str | os.PathLike | None = None,
    **options: Any,
) -> Any:
    """Convert ``source`` with the ``kind`` converter into ``out_dir``.

    Args:
        kind: ``yolo``, ``rsna``, ``masks`` or ``boxes``.
        source: the input folder, archive root or table.
        out_dir: dataset folder to create (nothing is left there on failure).
        key: de-identification key (see :func:`resolve_key`).
        key_file: file holding the key.
        **options: passed to the converter (``fractions``, ``seed``, ``yolo``, ``workers``,
            ``progress``, ``overwrite`` and converter-specific ones).

    Returns:
        The converter's ``ConversionResult``.
    """
    converter = get_converter(kind)
    secret = resolve_key(key, key_file, out_dir=out_dir)
    logger.info("converting %s source into %s", kind, out_dir)
    result = converter(source, out_dir, key=secret, **options)
    logger.info("wrote %d images, %d boxes to %s", result.num_images, result.num_boxes, result.out_dir)
    return result


def export_yolo(
    splits: Mapping[str, str | os.PathLike],
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    link_images: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a YOLO folder from COCO files ``{"train": path, "val": path, ...}``; returns ``data.yaml``.

    Runs under the same output lock as :func:`run_convert` (a second export or conversion into
    ``out_dir`` fails at once, naming this one) and first removes staging folders of ``out_dir``
    left by exports that died.

    Raises:
        OutputLockedError: another process is writing ``out_dir``.
    """
    from welde_det.datasets.coco import coco_to_yolo
    from welde_det.utils.locking import output_lock, remove_dead_staging

    with output_lock(out_dir, what="convert to-yolo"):
        remove_dead_staging(out_dir)
        return coco_to_yolo(
            dict(splits), image_root, out_dir, class_names=class_names, link_images=link_images, overwrite=overwrite
        )
