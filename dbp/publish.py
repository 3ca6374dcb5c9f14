"""Publishing a purifier + classifier pair to the Triton model repository as a new numbered version: the
checks export makes (checkpoint kinds, the pair loads as the server loads it, the ensemble's interface, the
card: signed, passing the pinned policy from its evidence, bound to these weights and the served settings,
compared with the deployed version) and then `dbp.repository.publish` (atomic). The CLI is training/export.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from . import repository
from .repository import RepositoryError


class ExportError(ValueError):
    """The pair cannot be published; the message says why (the CLI exits 2 with it)."""


def check_checkpoint(path: Path, role: str) -> dict:
    kinds = {"purifier": ckpt.PURIFIER_KINDS, "classifier": ckpt.CLASSIFIER_KINDS}[role]
    if not path.is_dir():
        raise ExportError(f"--{role}: {path} is not a directory")
    try:
        meta = ckpt.load_meta(path)
    except ckpt.CheckpointError as e:
        raise ExportError(f"--{role}: {e}") from None
    if meta.get("kind") not in kinds:
        raise ExportError(f"--{role}: {path} holds a {meta.get('kind')!r} checkpoint; a {role} needs "
                          f"kind {' or '.join(kinds)}")
    try:
        repository.serving_weights(path)
    except RepositoryError as e:
        raise ExportError(str(e)) from None
    return meta


def check_models_load(purifier: Path, classifier: Path):
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
    return eps, cls


def check_interface(repo: Path, eps, cls) -> None:
    """The ensemble's config names the pair's interface for the gateway (service/): `image_shape` "C,H,W" and
    `class_names`. A pair that does not match would be served with the wrong conversion or names."""
    import torch
    cfg = repo / "purify_classify" / repository.CONFIG_FILE
    params = repository.read_parameters(cfg)["parameters"] if cfg.exists() else {}
    c, size = int(eps.unet.config.in_channels), int(eps.unet.config.sample_size)
    shape = params.get("image_shape", {}).get("string_value")
    if shape and tuple(int(x) for x in shape.split(",")) != (c, size, size):
        raise ExportError(f"{cfg} says image_shape {shape} but the purifier takes {c},{size},{size}")
    if "class_names" in params:
        names = json.loads(params["class_names"]["string_value"])
        with torch.no_grad():
            n = int(cls(torch.zeros(1, c, size, size)).shape[1])
        if len(names) != n:
            raise ExportError(f"{cfg} names {len(names)} classes but the classifier has {n} outputs")


def deployed_baseline(repo: Path) -> Optional[dict]:
    """The weights' sha256 of the deployed (newest) version, which a new card must have been compared with."""
    v = repository.newest_version(repository.model_dir(repo, "purifier"))
    if v is None:
        return None
    return {f"{role}_sha256": ckpt.weights_sha256(repository.weights_dir(repo, role, v)) for role in repository.ROLES}


def check_card(card_path: Path, purifier: Path, classifier: Path, repo: Optional[Path] = None) -> dict:
    """The card is signed, passes the pinned policy from its evidence, is bound to these weights, meta.json and
    the repository's purification settings (purifier/config.pbtxt), and was compared with the deployed version."""
    from dbp.card import CardError, card_passes_for, load_card
    try:
        card = load_card(card_path)
    except CardError as e:
        raise ExportError(str(e)) from None
    served = repository.purification_settings(repo) if repo is not None else None
    baseline = deployed_baseline(repo) if repo is not None else None
    ok, reason = card_passes_for(card, {"purifier": purifier, "classifier": classifier}, served, baseline=baseline)
    if not ok:
        raise ExportError(f"refusing to export: {reason}")
    print(f"card ok: {reason}")
    return card


def build_engine(eps, card: dict, out_dir: Path, onnx: Optional[Path] = None, log=print) -> Path:
    """out_dir/engine/: the UNet as ONNX (exported from `eps`, the gated torch weights, or the given `onnx` file)
    and engine.json binding it to the card's purifier weights. Refuses (ExportError) when an engine's eps differ
    from torch's beyond dbp.serving.engines.TOLERANCE on the fixed parity inputs, for every CPU engine."""
    import shutil

    from dbp.card import binding_sha256
    from dbp.serving import engines

    d = Path(out_dir) / engines.ENGINE_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / engines.ONNX_FILE
    try:
        if onnx is None:
            sha = engines.export_onnx(eps, path)
        else:
            shutil.copyfile(onnx, path)
            sha = engines.file_sha256(path)
        parity, continuous = {}, set()
        for name in engines.CPU_ENGINES:
            net = engines.EngineEpsNet(name, path)
            parity[name] = engines.check_parity(eps, net)
            continuous.add(net.continuous_time)
    except engines.EngineError as e:
        raise ExportError(f"refusing to export: {e}") from None
    except Exception as e:  # noqa: BLE001 - the exporter failing is a reason to refuse
        raise ExportError(f"refusing to export: cannot export the UNet to ONNX: {type(e).__name__}: {e}") from None
    model = card.get("model") or {}
    m = engines.manifest(sha, model["purifier_sha256"], model.get("purifier_meta_sha256"), card.get("binding")
                         or binding_sha256(card), parity, continuous_time=continuous == {True})
    (d / engines.MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    log("engine ok: " + ", ".join(f"{k} max |d eps| {v:.2g}" for k, v in parity.items())
        + f" <= {engines.TOLERANCE:g} ({engines.ONNX_FILE} sha256 {sha[:12]})")
    return d


def export(purifier: str | Path, classifier: str | Path, card: str | Path,
           repo: str | Path = repository.DEFAULT_REPO, onnx: Optional[str | Path] = None) -> int:
    """Returns the version number written for both models. `onnx`: the purifier's ONNX file to ship instead of
    exporting one from its weights (checked for parity all the same)."""
    import tempfile

    purifier, classifier, card, repo = Path(purifier), Path(classifier), Path(card), Path(repo)
    try:
        repository.check_layout(repo)
        check_checkpoint(purifier, "purifier")
        check_checkpoint(classifier, "classifier")
        card_data = check_card(card, purifier, classifier, repo)
        eps, cls = check_models_load(purifier, classifier)
        check_interface(repo, eps, cls)
        with tempfile.TemporaryDirectory(prefix="dbp-engine-") as tmp:
            engine_dir = build_engine(eps, card_data, Path(tmp), Path(onnx) if onnx else None)
            return repository.publish(repo, {"purifier": purifier, "classifier": classifier}, card,
                                      extra_dirs={"purifier": (engine_dir,)})
    except RepositoryError as e:
        raise ExportError(str(e)) from None


def attach_engine(version_dir: str | Path, log=print) -> Path:
    """Add engine/ to a purifier version exported before engines existed: its card must still pass for its
    weights (the server's check), the ONNX is exported from those weights and checked like export does; written
    under a temporary name and renamed into place. Returns the engine dir."""
    import shutil
    import tempfile

    from dbp.models import load_unet
    from dbp.serving import engines

    version_dir = Path(version_dir)
    target = version_dir / engines.ENGINE_DIR
    if target.exists():
        raise ExportError(f"{target} exists already")
    try:
        card = repository.check_version(version_dir, "purifier")
    except RepositoryError as e:
        raise ExportError(str(e)) from None
    with repository.repo_lock(version_dir.parent.parent), \
            tempfile.TemporaryDirectory(prefix=".engine-", dir=version_dir) as tmp:
        built = build_engine(load_unet(version_dir / repository.WEIGHTS_DIR), card, Path(tmp), log=log)
        os.rename(built, target)
    log(f"attached {target}")
    return target
