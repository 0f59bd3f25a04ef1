"""De-identification: keyed pseudonyms, PHI-free metadata, burned-in-annotation flags.

Identifiers (UIDs, patient IDs, study IDs) are replaced by an HMAC-SHA256 pseudonym
under a secret key that lives **outside** the dataset (``WELDE_DEID_KEY`` or a key file
you pass); the same identifier gets the same pseudonym under the same key, so patients
stay grouped across files and splits, but the mapping cannot be inverted without the key.

Without either, :func:`obtain_key` uses the user's own key file
(:func:`default_key_path`: ``$XDG_CONFIG_HOME/welde_det/deid.key``, else
``~/.config/welde_det/deid.key``; ``%APPDATA%\\welde_det\\deid.key`` on Windows), creating
it on first use with a random 256-bit key readable by the user only (mode 0600), so a first
conversion needs no set-up and later ones give the same pseudonyms.

Only the technical fields in :data:`SAFE_FIELDS` ever leave a reader: no names, IDs,
dates, accession numbers, institution or free-text descriptions and comments.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KEY_ENV",
    "PHI_KEYWORDS",
    "SAFE_FIELDS",
    "KeySource",
    "burned_in_annotation",
    "default_key_path",
    "key_from_env",
    "load_key",
    "obtain_key",
    "png_text_chunks",
    "pseudonymise",
    "safe_metadata",
]

logger = logging.getLogger(__name__)

KEY_ENV = "WELDE_DEID_KEY"
#: File name of the user's own key inside :func:`user_config_dir`.
KEY_FILE_NAME = "deid.key"

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


def user_config_dir() -> Path:
    """welde_det's folder in the user's configuration directory (not created here).

    ``$XDG_CONFIG_HOME/welde_det`` (default ``~/.config/welde_det``); ``%APPDATA%\\welde_det``
    on Windows.
    """
    if os.name == "nt":
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "welde_det"


def default_key_path() -> Path:
    """The user's own de-identification key file: ``user_config_dir() / "deid.key"``."""
    return user_config_dir() / KEY_FILE_NAME


@dataclass(frozen=True)
class KeySource:
    """A de-identification key and where it came from.

    Attributes:
        key: the secret.
        origin: ``"argument"``, ``"key_file"``, ``"env"`` (``WELDE_DEID_KEY``),
            ``"user_key"`` (the existing default key file) or ``"created"`` (just created).
        path: the key file (``key_file``, ``user_key``, ``created``), else ``None``.
    """

    key: bytes
    origin: str
    path: Path | None = None

    def describe(self) -> str:
        """One line for logs (never the key itself)."""
        if self.origin == "created":
            return (f"created a new random de-identification key at {self.path} (readable by you only); keep it "
                    f"to give later conversions the same pseudonyms (or use --key-file / {KEY_ENV})")
        if self.origin == "user_key":
            return f"de-identification key: {self.path} (your default key file)"
        if self.origin == "key_file":
            return f"de-identification key: {self.path}"
        return {"env": f"de-identification key: ${KEY_ENV}", "argument": "de-identification key: given"}[self.origin]


def _create_key_file(path: Path) -> bool:
    """Write a random key to ``path`` with mode 0600 unless it exists; True if this call created it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and never replaces a key another process just wrote
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def obtain_key(
    key: str | bytes | None = None,
    key_file: str | os.PathLike | None = None,
    *,
    dataset_root: str | os.PathLike | None = None,
    create: bool = True,
) -> KeySource:
    """The de-identification key: ``key``, else ``key_file``, else ``$WELDE_DEID_KEY``, else
    the user's key file (:func:`default_key_path`), created on first use when ``create``.

    An explicit key, key file or ``WELDE_DEID_KEY`` always wins, so stable pseudonyms across
    machines only need the same key there.

    Args:
        key: the secret itself.
        key_file: a file holding it (stripped); refused inside ``dataset_root``.
        dataset_root: the output folder the key protects; no key file may lie inside it.
        create: create the user's key file if missing (else that is an error).

    Raises:
        ValueError: an empty key, a missing or empty key file, a key file inside the
            dataset, or no key at all with ``create=False``.
    """
    if key is not None:
        if len(key) == 0:
            raise ValueError("the de-identification key is empty")
        return KeySource(key.encode("utf-8") if isinstance(key, str) else bytes(key), "argument")
    if key_file is not None:
        return KeySource(load_key(key_file, dataset_root=dataset_root), "key_file", Path(key_file).resolve())
    env = key_from_env()
    if env:
        return KeySource(env, "env")
    path = default_key_path().absolute()
    if dataset_root is not None and Path(dataset_root).resolve() in path.resolve().parents:
        raise ValueError(f"the default key file {path} would lie inside the dataset {dataset_root}; "
                         f"pass --key-file outside it or set {KEY_ENV}")
    origin = "user_key"
    if not path.is_file():
        if not create:
            raise ValueError(f"no de-identification key: set {KEY_ENV}, pass --key-file (outside the dataset), "
                             f"or let welde_det create {path}")
        origin = "created" if _create_key_file(path) else "user_key"
    elif os.name != "nt" and path.stat().st_mode & 0o077:
        logger.warning("%s is readable by other users; chmod 600 it", path)
    return KeySource(load_key(path, dataset_root=dataset_root), origin, path)


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
