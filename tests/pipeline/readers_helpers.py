"""Helpers shared by the reader tests (test_readers_formats, test_readers_dicom, test_readers_real_files).

A plain module, not conftest.py: pytest imports every conftest.py under the one name ``conftest``, so
``from conftest import ...`` picks up another folder's conftest when several test folders run together.
"""
import json
import re

import pytest
from medsass.pipeline.discover import sniff
from medsass.pipeline.readers import Frame, read

from medsass.errors import InputError


def read1(path, fmt=None, **kw) -> Frame:
    [frame] = read(path, fmt or sniff(path), **kw)
    return frame


def code_of(path, fmt, **kw) -> str:
    with pytest.raises(InputError) as err:
        read(path, fmt, **kw)
    return err.value.code


PHI = ("Doe^Jane", "Doe", "Jane", "PID-98765", "Saint Example", "20240131", "ACC-4242")  # what make_dicom writes
_SAFE = re.compile(r"[A-Za-z0-9_.;:()\- ]{0,64}")


def assert_phi_free(meta: dict, secrets=PHI):
    text = json.dumps(meta)
    for secret in secrets:
        assert secret not in text
    for key, value in meta.items():
        assert re.fullmatch(r"[a-z_]+", key)
        assert value is None or isinstance(value, (bool, int, float)) or (
            isinstance(value, str) and _SAFE.fullmatch(value)
        ), (key, value)
