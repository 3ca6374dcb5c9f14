"""Publish a purifier + classifier pair to the Triton model repository as a new numbered version.

  python training/export.py --purifier runs/diffusion/checkpoint --classifier runs/classifier/checkpoint \
      --card runs/gate/card.json [--repo model_repository]

Refuses unless the robustness card passed the gate AND was computed on exactly these weights
(dbp.card.card_passes). Each version dir is built under a hidden temporary name inside the model dir and
renamed into place, so a polling Triton never sees half a version. Only the serving weights travel (EMA
if present, else the raw weights; never the optimizer). Version dirs beyond the config's
`version_policy { latest { num_versions: N } }` are deleted: rolling back = deleting the newest dir.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dbp import checkpoint as ckpt  # noqa: E402
from dbp.runtime import git_commit  # noqa: E402
from dbp.serving import CARD_FILE, WEIGHTS_DIR, ensure_bytecode  # noqa: E402

ROLES = {"purifier": ("diffusion", "addt"), "classifier": ("classifier",)}
TMP_PREFIX = ".export-"


class ExportError(RuntimeError):
    pass


def versions(model_dir: Path) -> list[int]:
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())


def num_versions_kept(model_dir: Path) -> int:
    """`latest { num_versions: N }` of the model's config.pbtxt: the server and the pruning agree on N."""
    m = re.search(r"latest\s*\{\s*num_versions\s*:\s*(\d+)", (model_dir / "config.pbtxt").read_text())
    if not m:
        raise ExportError(f"{model_dir}/config.pbtxt has no version_policy {{ latest {{ num_versions: N }} }}")
    return int(m.group(1))


def serving_weights(ckpt_dir: Path) -> Path:
    """The file dbp.checkpoint.weights_sha256 hashes and load_weights("ema") reads."""
    for name in ("ema.safetensors", "model.safetensors"):
        if (ckpt_dir / name).exists():
            return ckpt_dir / name
    raise ExportError(f"{ckpt_dir} has neither ema.safetensors nor model.safetensors")


def check_checkpoint(path: Path, role: str) -> dict:
    if not path.is_dir():
        raise ExportError(f"--{role}: {path} is not a directory")
    try:
        meta = ckpt.load_meta(path)
    except ckpt.CheckpointError as e:
        raise ExportError(f"--{role}: {e}") from None
    if meta.get("kind") not in ROLES[role]:
        raise ExportError(f"--{role}: {path} holds a {meta.get('kind')!r} checkpoint; a {role} needs "
                          f"kind {' or '.join(ROLES[role])}")
    serving_weights(path)
    return meta


def check_models_load(purifier: Path, classifier: Path) -> None:
    """Load both exactly as the server will, so a broken pair fails here and not at Triton load time."""
    from dbp.models import load_classifier, load_unet
    try:
        eps = load_unet(purifier)
        cls = load_classifier(classifier)
    except Exception as e:  # noqa: BLE001 - any failure to build is a reason to refuse
        raise ExportError(f"cannot load the checkpoints as the server would: {type(e).__name__}: {e}") from None
    c_pur, c_cls = int(eps.unet.config.in_channels), len(cls.normalize.mean.reshape(-1))
    if c_pur != c_cls:
        raise ExportError(f"the purifier works on {c_pur}-channel images but the classifier on {c_cls}")


def check_card(card_path: Path, purifier: Path, classifier: Path) -> dict:
    from dbp.card import CardError, card_passes, load_card
    try:
        card = load_card(card_path)
    except CardError as e:
        raise ExportError(str(e)) from None
    ok, reason = card_passes(card, purifier, classifier)
    if not ok:
        raise ExportError(f"refusing to export: {reason}")
    print(f"card ok: {reason}")
    return card


@contextmanager
def repo_lock(repo: Path):
    fd = os.open(repo, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two exports at once would pick the same version number
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True) + [root]:
        _fsync_dir(p)


def build_version(tmp: Path, model_dir: Path, ckpt_dir: Path, card_path: Path, provenance: dict) -> None:
    template = model_dir / "model.py"
    if not template.exists():
        raise ExportError(f"no model.py template at {template}")
    (tmp / WEIGHTS_DIR).mkdir(parents=True)
    shutil.copy2(template, tmp / "model.py")
    ensure_bytecode(tmp / "model.py")  # else the stub's own .pyc looks like a new version to a polling server
    meta = ckpt.load_meta(ckpt_dir)
    meta.pop("optimizer", None)  # optimizer state has no business in a serving artifact
    (tmp / WEIGHTS_DIR / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    src = serving_weights(ckpt_dir)
    shutil.copy2(src, tmp / WEIGHTS_DIR / src.name)
    shutil.copy2(card_path, tmp / CARD_FILE)
    (tmp / "export.json").write_text(json.dumps(provenance, indent=2))
    if ckpt.weights_sha256(tmp / WEIGHTS_DIR) != ckpt.weights_sha256(ckpt_dir):
        raise ExportError(f"copy of {src} does not hash like the original")
    _fsync_tree(tmp)


def prune(model_dir: Path, keep: int) -> list[Path]:
    removed = []
    for v in versions(model_dir)[:-keep]:
        shutil.rmtree(model_dir / str(v))
        removed.append(model_dir / str(v))
    return removed


def export(purifier: str | Path, classifier: str | Path, card: str | Path,
           repo: str | Path = "model_repository") -> int:
    """Returns the version number written for both models."""
    purifier, classifier, card, repo = Path(purifier), Path(classifier), Path(card), Path(repo)
    dirs = {"purifier": repo / "purifier", "classifier": repo / "classifier"}
    for role, d in dirs.items():
        if not (d / "config.pbtxt").exists():
            raise ExportError(f"{repo} is not the model repository: no {role}/config.pbtxt")
    check_checkpoint(purifier, "purifier")
    check_checkpoint(classifier, "classifier")
    check_card(card, purifier, classifier)
    check_models_load(purifier, classifier)
    sources = {"purifier": purifier, "classifier": classifier}

    with repo_lock(repo):
        for d in dirs.values():  # leftovers of a killed export; safe under the lock
            for t in d.glob(TMP_PREFIX + "*"):
                shutil.rmtree(t, ignore_errors=True)
        # one number for the pair, so purifier/N and classifier/N were exported (and gated) together
        version = max([0] + [v for d in dirs.values() for v in versions(d)]) + 1
        prov = {"version": version, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
                "card": str(card.resolve()),
                "sources": {r: {"dir": str(p.resolve()), "sha256": ckpt.weights_sha256(p)} for r, p in sources.items()}}
        tmps = {r: d / f"{TMP_PREFIX}{version}-{secrets.token_hex(4)}" for r, d in dirs.items()}
        try:
            for role, tmp in tmps.items():
                build_version(tmp, dirs[role], sources[role], card, prov)
            # classifier first: a server that polls in between pairs the old purifier with the new
            # classifier for a moment rather than a new purifier with an old classifier
            for role in ("classifier", "purifier"):
                os.rename(tmps[role], dirs[role] / str(version))
                _fsync_dir(dirs[role])
        finally:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)
        for role, d in dirs.items():
            for p in prune(d, num_versions_kept(d)):
                print(f"removed {p} (version_policy keeps {num_versions_kept(d)})")
    for role, d in dirs.items():
        print(f"exported {d / str(version)}")
    return version


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--purifier", required=True, help="diffusion/ADDT checkpoint dir (meta.json + weights)")
    p.add_argument("--classifier", required=True, help="classifier checkpoint dir")
    p.add_argument("--card", required=True, help="robustness card JSON written by the gate for these weights")
    p.add_argument("--repo", default="model_repository", help="Triton model repository (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        export(a.purifier, a.classifier, a.card, a.repo)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
