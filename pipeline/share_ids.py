"""The opaque ids of a shared copy and the private map back to the originals (``medsass-prep share``, :mod:`.share`).

Every id is an HMAC-SHA256 keyed by the store's salt, one domain per kind of value, so the ids are the same on every
re-share of a store and link neither to the original store nor to other stores built with the same salt. The map
(shared id -> sample_id, source, source_rel, label_source, group) stays in the original store's
``_medsass/share/ids.parquet``, mode 0600, with a check of the key beside it (``key.json``): a re-share with another
salt is refused, since the shared ids would change.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import pyarrow as pa

from medsass import manifest, store
from medsass.errors import StoreError

SHARE_DIR = "share"  # under the original store's _medsass/
MAP_FILE = "ids.parquet"
KEY_FILE = "key.json"
MAP_COLUMNS = ("sample_id", "source", "source_rel", "label_source", "group", "status", "row")


class Keys:
    """The opaque ids: HMAC-SHA256 keyed by the store's salt, one domain per kind of value."""

    def __init__(self, salt: str):
        self.key = salt.encode()

    def _mac(self, kind: str, value: str) -> str:
        return hmac.new(self.key, f"medsass-share:{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()

    def sample(self, v: str) -> str:
        return "rec-" + self._mac("sample", v)[:20] if v else ""

    def source(self, v: str) -> str:
        return "file-" + self._mac("source", v)[:16] if v else ""

    def group(self, v: str) -> str:
        return self._mac("group", v)[:16] if v else ""

    def check(self) -> str:
        return self._mac("key-check", "")[:16]


def store_salt(src: Path, salt: str | None) -> str:
    """The salt the ids are keyed by: the store's own (``_medsass/salt``), else the one given."""
    path = store.work_dir(src) / "salt"
    if path.exists():  # the store's own salt wins: the ids must not depend on what the environment holds
        own = path.read_text().strip()
        if salt and salt != own:
            raise StoreError(f"{src} keeps its own salt ({path}) and the salt given (--salt, --salt-file or "
                             "MEDSASS_SALT) differs; give none (unset MEDSASS_SALT)")
        return own
    if salt:
        return salt
    raise StoreError(f"{src} keeps no salt ({path}): it was built with --salt / --salt-file / MEDSASS_SALT. Give "
                     "the same salt to share (--salt-file or MEDSASS_SALT), so that shared ids stay the same")


def id_mapping(table: pa.Table, keys: Keys, src: Path) -> pa.Table:
    """The private mapping of the manifest ``table``: one row per manifest row, shared ids beside the originals."""
    col = {c: table.column(c).to_pylist() for c in MAP_COLUMNS}
    shared = [keys.sample(s) for s in col["sample_id"]]
    pairs = {}
    for s, o in zip(col["sample_id"], shared):
        if pairs.setdefault(o, s) != s:  # pragma: no cover - 80 bits
            raise StoreError(f"two sample ids of {src} give the same shared id {o}; report this")
    return pa.table({
        "shared_id": shared, "sample_id": col["sample_id"], "status": col["status"], "row": col["row"],
        "source": col["source"], "shared_source": [keys.source(s) for s in col["source"]],
        "source_rel": col["source_rel"], "label_source": col["label_source"],
        "group": col["group"], "shared_group": [keys.group(g) for g in col["group"]],
    })


def write_private(src: Path, keys: Keys, mapping: pa.Table) -> Path:
    """Write the mapping (and the key check) into the original store's ``_medsass/share/``; returns the map's path."""
    home = store.work_dir(src) / SHARE_DIR
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_file = home / KEY_FILE
    if key_file.exists() and json.loads(key_file.read_text()).get("key_check") != keys.check():
        raise StoreError(f"{src} was shared before with another salt ({key_file}); give the salt of that share, "
                         "or the shared ids would change")
    manifest.atomic_write_bytes(key_file, json.dumps({"key_check": keys.check()}).encode(), mode=0o600)
    path = home / MAP_FILE
    manifest.atomic_write_bytes(path, manifest.table_bytes(mapping), mode=0o600)  # as secret as the salt
    os.chmod(path, 0o600)  # atomic_write_bytes applies the umask, which may not clear the owner's bits only
    return path
