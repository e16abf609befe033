"""Just enough of X.509 to name a certificate's holder without a crypto library: the
PEM blocks of a file and the subject's common name in a certificate's DER.

The agent reads its own etcd certificate at start; with this it does so without
loading ``cryptography`` (about 9 MiB of its memory), the TLS checks themselves being
OpenSSL's, through :mod:`ssl`.
"""

from __future__ import annotations

import base64
import binascii
import re

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)
_COMMON_NAME = bytes.fromhex("550403")  # 2.5.4.3
_SEQUENCE, _SET, _OID, _VERSION = 0x30, 0x31, 0x06, 0xA0
_TEXT = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x14: "latin-1",  # TeletexString, as OpenSSL reads it
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}


def certificates(pem: bytes) -> list[bytes]:
    """The DER of each ``CERTIFICATE`` block of a PEM file, in order; ValueError when a
    block is not base64."""
    try:
        return [base64.b64decode(b"".join(m.split()), validate=True) for m in _PEM.findall(pem)]
    except binascii.Error as err:
        raise ValueError(f"a certificate block is not base64 ({err})") from None


def _items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The (tag, start, end) of each element between ``start`` and ``end``."""
    out = []
    i = start
    while i < end:
        if i + 2 > end:
            raise ValueError("truncated element")
        tag, length = data[i], data[i + 1]
        i += 2
        if length & 0x80:
            n = length & 0x7F
            if not 0 < n <= 4 or i + n > end:
                raise ValueError("bad length")
            length = int.from_bytes(data[i : i + n], "big")
            i += n
        if i + length > end:
            raise ValueError("element longer than its container")
        out.append((tag, i, i + length))
        i += length
    return out


def _one(data: bytes, start: int, end: int, tag: int) -> tuple[int, int]:
    items = _items(data, start, end)
    if not items or items[0][0] != tag:
        raise ValueError(f"expected tag {tag:#x}")
    return items[0][1], items[0][2]


def common_name(der: bytes) -> str:
    """The subject's first common name ("" when it has none); ValueError when ``der``
    is not a certificate."""
    cert = _one(der, 0, len(der), _SEQUENCE)
    tbs = _one(der, *cert, _SEQUENCE)
    fields = _items(der, *tbs)
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject
    if len(fields) < 5 or fields[4][0] != _SEQUENCE:
        raise ValueError("no subject")
    for rdn_tag, rdn_start, rdn_end in _items(der, fields[4][1], fields[4][2]):
        if rdn_tag != _SET:
            raise ValueError("bad subject")
        for atv_tag, atv_start, atv_end in _items(der, rdn_start, rdn_end):
            if atv_tag != _SEQUENCE:
                raise ValueError("bad subject")
            parts = _items(der, atv_start, atv_end)
            if len(parts) != 2 or parts[0][0] != _OID:
                raise ValueError("bad subject")
            if der[parts[0][1] : parts[0][2]] == _COMMON_NAME:
                kind, start, end = parts[1]
                if kind not in _TEXT:
                    raise ValueError(f"common name of string type {kind:#x}")
                return der[start:end].decode(_TEXT[kind])
    return ""
