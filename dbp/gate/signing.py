"""Signed cards: the gate signs card + weights + policy (all inside the card: the model block holds the weights'
and meta's sha256, the policy block the policy's); export and the server verify against the public keys in
dbp/gate/trusted_keys/ (package data, so they travel with dbp). Ed25519 from the `cryptography` library.

The private key never enters the repository: the gate reads it from the file named by DBP_GATE_SIGNING_KEY.
DBP_GATE_TRUSTED_KEYS names another directory of *.pub files to trust INSTEAD of the shipped ones (a
deployment with its own signing key; the tests, which make their own key pair).

  python -m dbp.gate.signing new --private ~/.config/dbp/gate-ed25519.pem   # new pair; public -> trusted_keys/
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .policy import canonical_sha256

TRUSTED_KEYS_DIR = Path(__file__).resolve().parent / "trusted_keys"
SIGNING_KEY_ENV, TRUSTED_KEYS_ENV = "DBP_GATE_SIGNING_KEY", "DBP_GATE_TRUSTED_KEYS"
ALG = "ed25519"


class SignatureError(ValueError):
    """A card is unsigned, signed by an untrusted key, or its signature does not match its content."""


def payload_sha256(card: Mapping[str, Any]) -> str:
    """What the signature covers: the whole card but its signature block, as canonical JSON."""
    body = {k: v for k, v in card.items() if k != "signature"}
    return canonical_sha256(body)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: str | Path | None = None) -> Optional[Ed25519PrivateKey]:
    """The signing key from `path` or DBP_GATE_SIGNING_KEY; None when neither is set."""
    path = path or os.environ.get(SIGNING_KEY_ENV)
    if not path:
        return None
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot read the signing key {path} ({SIGNING_KEY_ENV}): {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def trusted_keys(directory: str | Path | None = None) -> dict[str, Ed25519PublicKey]:
    """key id -> public key, from `directory`, DBP_GATE_TRUSTED_KEYS or the shipped trusted_keys/."""
    d = Path(directory or os.environ.get(TRUSTED_KEYS_ENV) or TRUSTED_KEYS_DIR)
    out = {}
    for f in sorted(d.glob("*.pub")) if d.is_dir() else []:
        try:
            key = serialization.load_pem_public_key(f.read_bytes())
        except ValueError:
            continue
        if isinstance(key, Ed25519PublicKey):
            out[key_id(key)] = key
    return out


def sign(card: dict, private: Ed25519PrivateKey) -> dict:
    """A copy of `card` with its signature block."""
    card = copy.deepcopy({k: v for k, v in card.items() if k != "signature"})
    digest = payload_sha256(card)
    sig = private.sign(bytes.fromhex(digest))
    card["signature"] = {"alg": ALG, "key_id": key_id(private.public_key()), "payload_sha256": digest,
                         "signature": base64.b64encode(sig).decode()}
    return card


def verify(card: Mapping[str, Any], keys: Optional[Mapping[str, Ed25519PublicKey]] = None) -> str:
    """The signing key's id if the card is signed by a trusted key over exactly its content; else raises."""
    keys = trusted_keys() if keys is None else keys
    sig = card.get("signature")
    if not isinstance(sig, Mapping):
        raise SignatureError("the card is not signed (cards are signed by the gate with DBP_GATE_SIGNING_KEY)")
    if sig.get("alg") != ALG:
        raise SignatureError(f"unsupported signature algorithm {sig.get('alg')!r}")
    key = keys.get(str(sig.get("key_id")))
    if key is None:
        raise SignatureError(f"the card is signed by key {sig.get('key_id')!r}, which is not trusted "
                             f"({len(keys)} trusted key(s) in {os.environ.get(TRUSTED_KEYS_ENV) or TRUSTED_KEYS_DIR})")
    digest = payload_sha256(card)
    try:
        key.verify(base64.b64decode(str(sig.get("signature")), validate=True), bytes.fromhex(digest))
    except (InvalidSignature, ValueError):
        raise SignatureError("the signature does not match the card's content (edited after signing?)") from None
    return str(sig["key_id"])


def new_key_pair(private_path: str | Path, public_dir: str | Path = TRUSTED_KEYS_DIR) -> tuple[Path, Path]:
    """Write a new private key (mode 0600) and its public key as <key id>.pub in `public_dir`."""
    private_path, public_dir = Path(private_path), Path(public_dir)
    if private_path.exists():
        raise SignatureError(f"{private_path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public_dir.mkdir(parents=True, exist_ok=True)
    pub = public_dir / f"{key_id(key.public_key())}.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, pub


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbp.gate.signing", description="the gate's signing keys")
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("new", help="a new key pair: private key to --private, public key into --public_dir")
    n.add_argument("--private", required=True)
    n.add_argument("--public_dir", default=str(TRUSTED_KEYS_DIR))
    a = p.parse_args(argv)
    try:
        priv, pub = new_key_pair(a.private, a.public_dir)
    except SignatureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"private key: {priv} (keep it out of the repository; the gate reads it from ${SIGNING_KEY_ENV})\n"
          f"public key:  {pub} (commit it: export and the server trust the keys in that folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
