"""De-identification: keyed pseudonyms, PHI-free metadata, burned-in-annotation flags.

Identifiers (UIDs, patient IDs, study IDs) are replaced by an HMAC-SHA256 pseudonym
under a secret key that lives **outside** the dataset (``WELDE_DEID_KEY`` or a key file
you pass); the same identifier gets the same pseudonym under the same key, so patients
stay grouped across files and splits, but the mapping cannot be inverted without the key.

Only the technical fields in :data:`SAFE_FIELDS` ever leave a reader: no names, IDs,
dates, accession numbers, institution or free-text descriptions and comments.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

__all__ = [
    "KEY_ENV",
    "PHI_KEYWORDS",
    "SAFE_FIELDS",
    "burned_in_annotation",
    "key_from_env",
    "load_key",
    "png_text_chunks",
    "pseudonymise",
    "safe_metadata",
]

KEY_ENV = "WELDE_DEID_KEY"

#: DICOM keywords that identify a person, place or time, or carry free text.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthTime",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup",
    "PatientComments", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy", "RequestingPhysician",
    "StationName", "DeviceSerialNumber", "StudyDescription", "SeriesDescription", "ImageComments",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription", "ProtocolName", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "MediaStorageSOPInstanceUID",
)

#: Technical fields that are kept (none identifies a person).
SAFE_FIELDS = (
    "Modality", "MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "SliceThickness", "SpacingBetweenSlices", "PixelSpacing", "Rows", "Columns", "BitsStored",
    "Manufacturer", "ManufacturerModelName", "ScanningSequence", "SequenceVariant", "MRAcquisitionType",
    "PhotometricInterpretation", "PatientPosition", "BodyPartExamined",
)


def pseudonymise(value: Any, key: str | bytes, *, length: int = 16) -> str:
    """HMAC-SHA256 pseudonym of ``value`` under ``key``, as ``length`` hex characters.

    Raises:
        ValueError: an empty key, or a length outside 8..64.
    """
    if key is None or len(key) == 0:
        raise ValueError(
            "de-identification needs a secret key: set the WELDE_DEID_KEY environment variable or pass "
            "a key file (keep it outside the dataset)"
        )
    if not 8 <= length <= 64:
        raise ValueError(f"pseudonym length must be in 8..64, got {length}")
    k = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return hmac.new(k, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def key_from_env() -> bytes | None:
    """The key in ``WELDE_DEID_KEY``, or None."""
    value = os.environ.get(KEY_ENV)
    return value.encode("utf-8") if value else None


def load_key(path: str | os.PathLike | None = None, *, dataset_root: str | os.PathLike | None = None) -> bytes:
    """Read the de-identification key from a file or ``WELDE_DEID_KEY``.

    Args:
        path: key file (its stripped content is the key); None reads the environment.
        dataset_root: if given, a key file inside it is refused (the key must live outside).

    Raises:
        ValueError: no key, an empty key, or a key file inside the dataset.
    """
    if path is None:
        key = key_from_env()
        if not key:
            raise ValueError(f"no de-identification key: set {KEY_ENV} or pass --key-file (outside the dataset)")
        return key
    p = Path(path).resolve()
    if dataset_root is not None and Path(dataset_root).resolve() in p.parents:
        raise ValueError(f"key file {p} lies inside the dataset {dataset_root}; keep the key outside it")
    if not p.is_file():
        raise ValueError(f"key file {p} not found")
    key = p.read_bytes().strip()
    if not key:
        raise ValueError(f"key file {p} is empty")
    return key


def burned_in_annotation(ds: Any) -> bool:
    """Whether pixels may carry burned-in text: BurnedInAnnotation=YES, or a secondary capture / screen save."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return True
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "SCREEN SAVE" in " ".join(image_type):
        return True
    sop = str(ds.get("SOPClassUID", ""))
    return sop.startswith("1.2.840.10008.5.1.4.1.1.7")  # secondary capture family


def safe_metadata(ds: Any, key: str | bytes | None = None) -> dict[str, Any]:
    """The technical, non-identifying fields of a DICOM dataset, plus keyed pseudonyms.

    Args:
        ds: a pydicom Dataset.
        key: if given, ``patient``, ``study`` and ``series`` pseudonyms are added.

    Returns:
        A JSON-serialisable dict holding only :data:`SAFE_FIELDS`, the pseudonyms and the
        ``burned_in_annotation`` flag.
    """
    out: dict[str, Any] = {}
    for name in SAFE_FIELDS:
        if name in ds:
            value = ds.get(name)
            if value is None or value == "":
                continue
            if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
                value = [_plain(v) for v in value]
            else:
                value = _plain(value)
            out[name] = value
    if key is not None:
        out["patient"] = pseudonymise(f"patient:{ds.get('PatientID', '')}", key)
        out["study"] = pseudonymise(f"study:{ds.get('StudyInstanceUID', '')}", key)
        out["series"] = pseudonymise(f"series:{ds.get('SeriesInstanceUID', '')}", key)
    out["burned_in_annotation"] = burned_in_annotation(ds)
    return out


def _plain(v: Any) -> Any:
    for cast in (int, float):
        try:
            f = cast(v)
            if str(f) == str(v) or cast is float:
                return f
        except (TypeError, ValueError):
            continue
    return str(v)


def png_text_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every tEXt/zTXt/iTXt/eXIf chunk in PNG bytes (for audits and tests)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not PNG data")
    out, pos = [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        if ctype in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            out.append((ctype, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out
