"""What a saved artifact is and whether it is still what was written: role, format, sha256.

A folder of files (the perfusion model, a training workdir's metadata, the refiner) gets a
`manifest.json`, written last and atomically: {"kind", "manifest_version", "files": {name:
{"role", "format_version", "sha256"}}}. A loader calls `verify_folder` after parsing, so a
swapped, renamed or edited file is refused with one line naming it, e.g.

    model/abnormal.npz: holds the ischemia_vs_infarction model (swapped or renamed?)
    model/abnormal.npz: checksum mismatch (edited after it was written?)

A single file that carries its own metadata (an ONNX model) records the same three in a
metadata property (`seal_onnx`, `check_onnx`): the sha256 is of every top-level protobuf
field but that property, read from the bytes so neither side needs the onnx package.

A folder or file written before these records loads with one warning (once per process)
saying it is unverified and how to re-save it: refusing it would strand every old model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping

from cardiac_core.fileio import atomic_write_bytes, write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ONNX_KEY = "integrity"  # the ONNX metadata property holding the record
_warned: set[str] = set()


class IntegrityError(ValueError):
    """A file that is not what its folder's manifest (or its own record) says it is."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logging.warning("%s", message)


# ------------------------------------------------------------------------------ folders


def write_manifest(
    folder: os.PathLike, files: Mapping[str, tuple[str, int]], *, kind: str
) -> pathlib.Path:
    """Hashes each `files` entry (relative name -> (role, format_version)) as it is now and
    writes folder/manifest.json atomically. Call it after every file is written."""
    folder = pathlib.Path(folder)
    entries = {}
    for name, (role, version) in sorted(files.items()):
        entries[name] = {
            "role": role,
            "format_version": int(version),
            "sha256": sha256_file(folder / name),
        }
    record = {"kind": kind, "manifest_version": MANIFEST_VERSION, "files": entries}
    return write_json_atomic(folder / MANIFEST, record)


def update_manifest(
    folder: os.PathLike,
    files: Mapping[str, tuple[str, int]],
    *,
    kind: str,
    others: Mapping[str, tuple[str, int]] | None = None,
) -> pathlib.Path:
    """Records `files` (just written) in the folder's manifest, keeping its other entries, for
    a folder whose files are written at different times (a training workdir). A folder without
    a manifest gets one that also records the `others` present now: that re-saves it."""
    folder = pathlib.Path(folder)
    current = read_manifest(folder, kind=kind)
    if current is None:
        current = {}
        files = {**{n: v for n, v in (others or {}).items() if (folder / n).is_file()}, **files}
    record = {"kind": kind, "manifest_version": MANIFEST_VERSION, "files": dict(current)}
    for name, (role, version) in files.items():
        record["files"][name] = {
            "role": role,
            "format_version": int(version),
            "sha256": sha256_file(folder / name),
        }
    record["files"] = dict(sorted(record["files"].items()))
    return write_json_atomic(folder / MANIFEST, record)


def read_manifest(folder: os.PathLike, *, kind: str) -> dict | None:
    """The manifest's {name: entry}, None when the folder has none (written before them)."""
    path = pathlib.Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        for name, e in files.items():
            if not (isinstance(e["role"], str) and isinstance(e["sha256"], str)):
                raise TypeError(f"entry {name!r} lacks a role or sha256")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e}); re-save the folder") from None
    if record.get("kind") != kind:
        raise IntegrityError(
            f"{path}: the manifest of a {record.get('kind')!r}, not a {kind!r} (wrong folder?)"
        )
    return files


def verify_folder(
    folder: os.PathLike,
    *,
    kind: str,
    names: Iterable[str] | None = None,
    format_versions: Mapping[str, int] | None = None,
    resave: str = "re-save it",
) -> bool:
    """Checks every file the manifest lists, and `names` (the files the caller reads: one
    the manifest does not list is refused when present, skipped when absent).

    True when verified; False, after one warning line, when the folder has no manifest.
    Raises IntegrityError (one line naming the file) for a file that is missing, not listed,
    holds another listed file's contents (swapped or renamed), of another format version, or
    whose checksum differs (edited). format_versions: {name: version this code reads}.
    """
    folder = pathlib.Path(folder)
    files = read_manifest(folder, kind=kind)
    if files is None:
        _warn_once(
            str(folder.resolve()),
            f"{folder}: no {MANIFEST}, so its files are unverified (written before integrity "
            f"records, or the manifest was deleted); {resave} to record them",
        )
        return False
    by_sha = {e["sha256"]: (n, e["role"]) for n, e in files.items()}
    for name in dict.fromkeys([*files, *(names or [])]):
        path = folder / name
        entry = files.get(name)
        if entry is None:
            if path.exists():
                raise IntegrityError(
                    f"{path}: not listed in {folder / MANIFEST} (added after it was written?)"
                )
            continue  # an optional file the folder does not have
        if not path.is_file():
            _missing(folder, name, files)
        sha = sha256_file(path)
        if sha != entry["sha256"]:
            if sha in by_sha and by_sha[sha][0] != name:
                raise IntegrityError(f"{path}: holds the {by_sha[sha][1]} (swapped or renamed?)")
            raise IntegrityError(f"{path}: checksum mismatch (edited after it was written?)")
        want = (format_versions or {}).get(name)
        if want is not None and entry.get("format_version") != want:
            raise IntegrityError(
                f"{path}: format version {entry.get('format_version')!r}, this code reads "
                f"{want}; {resave}"
            )
    return True


def verify_present(folder: os.PathLike, *, kind: str) -> None:
    """Cheap check before parsing (no hashing): every file the manifest lists is there, so a
    renamed file is named as such rather than as a reader's "file not found"."""
    folder = pathlib.Path(folder)
    files = read_manifest(folder, kind=kind) or {}
    for name in files:
        if not (folder / name).is_file():
            _missing(folder, name, files)


def _missing(folder: pathlib.Path, name: str, files: dict) -> None:
    moved = _find_contents(folder, files[name]["sha256"], set(files))
    where = f"; its contents are in {moved} (renamed?)" if moved else " (renamed or deleted?)"
    raise IntegrityError(f"{folder / name}: missing, though {MANIFEST} lists it{where}")


def _find_contents(folder: pathlib.Path, sha: str, listed: set[str]) -> str | None:
    """The unlisted file of `folder` (top level) whose contents hash to `sha`, if any."""
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name not in listed and p.name != MANIFEST and sha256_file(p) == sha:
            return p.name
    return None


# --------------------------------------------------------------------------------- ONNX


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, start, end, payload start) of each top-level protobuf field."""
    i = 0
    while i < len(data):
        start = i
        tag, i = _varint(data, i)
        number, wire = tag >> 3, tag & 7
        payload = i
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(data, i)
            payload, i = i, i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("truncated field")
        yield number, start, i, payload


_METADATA_FIELD = 14  # ModelProto.metadata_props (StringStringEntryProto: key 1, value 2)


def _entry(data: bytes, payload: int, end: int) -> tuple[str, str]:
    key = value = ""
    for number, _, stop, p in _fields(data[payload:end]):
        text = data[payload + p : payload + stop].decode("utf-8", "replace")
        key, value = (text, value) if number == 1 else (key, text) if number == 2 else (key, value)
    return key, value


def _split_onnx(data: bytes) -> tuple[bytes, str | None]:
    """(the model's bytes without the integrity property, that property's value or None)."""
    kept, record = [], None
    for number, start, end, payload in _fields(data):
        if number == _METADATA_FIELD and _entry(data, payload, end)[0] == ONNX_KEY:
            record = _entry(data, payload, end)[1]
            continue
        kept.append(data[start:end])
    return b"".join(kept), record


def onnx_properties(data: bytes) -> dict[str, str]:
    """The metadata properties (key: value) of serialized ONNX bytes, read without the onnx
    package, so a runtime that converts the model itself still checks the bytes it was given.
    ValueError when the bytes are not a protobuf message."""
    props = {}
    for number, _, end, payload in _fields(data):
        if number == _METADATA_FIELD:
            key, value = _entry(data, payload, end)
            props[key] = value
    return props


def _length_delimited(number: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def seal_onnx(data: bytes, *, role: str, format_version: int) -> bytes:
    """A serialized ONNX model with its integrity property (re)written: role, format version
    and the sha256 of every other top-level field. A repeated protobuf field may come last."""
    body, _ = _split_onnx(data)
    record = json.dumps(
        {"role": role, "format_version": int(format_version), "sha256": sha256_bytes(body)}
    )
    entry = _length_delimited(1, ONNX_KEY.encode()) + _length_delimited(2, record.encode())
    return body + _length_delimited(_METADATA_FIELD, entry)


def write_onnx(path: os.PathLike, data: bytes, *, role: str, version: int) -> pathlib.Path:
    """Writes serialized ONNX bytes atomically, sealed by `seal_onnx`."""
    sealed = seal_onnx(data, role=role, format_version=version)
    return atomic_write_bytes(pathlib.Path(path), sealed)


def check_onnx(
    data: bytes, path, *, role: str, format_version: int, resave: str = "re-export it"
) -> bool:
    """True when the ONNX bytes match their integrity record; False, after one warning, when
    they have none (written before it). IntegrityError (one line) when edited or another role."""
    try:
        body, record = _split_onnx(data)
    except ValueError as e:
        raise IntegrityError(f"{path}: not a protobuf model file ({e})") from None
    if record is None:
        _warn_once(
            str(pathlib.Path(path).resolve()),
            f"{path}: no integrity record, so it is unverified (exported before them); {resave}",
        )
        return False
    try:
        info = json.loads(record)
        have_role, have_version, sha = info["role"], info["format_version"], info["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{path}: unreadable integrity record ({e}); {resave}") from None
    if have_role != role:
        raise IntegrityError(f"{path}: holds a {have_role}, not a {role} (wrong file?)")
    if sha != sha256_bytes(body):
        raise IntegrityError(f"{path}: checksum mismatch (edited after it was written?)")
    if have_version != format_version:
        raise IntegrityError(
            f"{path}: format version {have_version!r}, this code reads {format_version}; {resave}"
        )
    return True
