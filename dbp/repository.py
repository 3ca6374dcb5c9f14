"""The Triton model repository (model_repository/): the one module that knows its layout and rules.

  model_repository/
    purifier/config.pbtxt, purifier/model.py     the model's config and the shell copied into each version
    purifier/<N>/weights/                        a dbp checkpoint dir holding only the serving weights
    purifier/<N>/robustness_card.json            the gate's card for exactly these weights (profile "default")
    purifier/<N>/cards/<profile>.json            the card of another serving profile (config.pbtxt `profiles`)
    purifier/<N>/export.json                     provenance (sources, git commit, time)
    purifier/<N>/model.py (+ __pycache__)        a copy of the shell
    classifier/...                               the same; purifier/N and classifier/N were gated together

Used by export (publish), the Triton services (check_version), the gate, the training CLIs (their default
models: the newest deployed version) and the benchmarks. Torch-free: a gateway may import it.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Optional

WEIGHTS_DIR = "weights"
CARD_FILE = "robustness_card.json"
CARDS_DIR = "cards"  # <version>/cards/<profile>.json: the card of a serving profile other than "default"
DEFAULT_PROFILE = "default"  # dbp.serving.contract.DEFAULT_PROFILE: the top-level settings, card CARD_FILE
EXPORT_FILE = "export.json"
LEGACY_FILE = "legacy.json"  # at the repository root: versions served although their card fails (check_version)
MODEL_FILE = "model.py"
CONFIG_FILE = "config.pbtxt"
TMP_PREFIX = ".export-"  # versions are built under this hidden name, then renamed into place
ROLES = ("purifier", "classifier")
# the certified-radius model (randomized smoothing, dbp.certify): certify/<N>/weights is its denoiser UNet,
# certify/<N>/certify_card.json the card of experiments/certify/card.py bound to that UNet and to the classifier
# version its config.pbtxt names (`classifier_version`). Optional: served only once a version has weights.
CERTIFY_MODEL = "certify"
CERTIFY_CARD_FILE = "certify_card.json"
OPTIONAL_MODELS = (CERTIFY_MODEL,)
DEFAULT_REPO = "model_repository"


class RepositoryError(ValueError):
    """The repository or one of its versions is not as it must be; the message names the problem."""


# ---- paths and version numbers --------------------------------------------------------------------

def default_repository() -> Path:
    """./model_repository when run from a checkout's root, else the one beside the installed dbp package."""
    here = Path(DEFAULT_REPO)
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / DEFAULT_REPO


def model_dir(repo: str | Path, role: str) -> Path:
    return Path(repo) / role


def version_dir(repo: str | Path, role: str, version: int) -> Path:
    return model_dir(repo, role) / str(int(version))


def weights_dir(repo: str | Path, role: str, version: int) -> Path:
    return version_dir(repo, role, version) / WEIGHTS_DIR


def versions(model_dir: str | Path) -> list[int]:
    """The numbered version dirs of one model, ascending (hidden temp dirs of an export do not count)."""
    d = Path(model_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def newest_version(model_dir: str | Path) -> Optional[int]:
    vs = versions(model_dir)
    return vs[-1] if vs else None


def check_layout(repo: str | Path) -> None:
    for role in ROLES:
        if not (model_dir(repo, role) / CONFIG_FILE).exists():
            raise RepositoryError(f"{repo} is not the model repository: no {role}/{CONFIG_FILE}")


def deployed_weights(role: str, repo: str | Path | None = None) -> Path:
    """The weights dir of the newest version of `role`: what Triton serves, and what training starts from."""
    repo = Path(repo) if repo is not None else default_repository()
    v = newest_version(model_dir(repo, role))
    if v is None:
        raise RepositoryError(f"no deployed {role} in {repo}: no numbered version under {model_dir(repo, role)}")
    return weights_dir(repo, role, v)


def num_versions_kept(model_dir: str | Path) -> int:
    """`latest { num_versions: N }` of the model's config.pbtxt: the server and the pruning agree on N."""
    cfg = Path(model_dir) / CONFIG_FILE
    m = re.search(r"latest\s*\{\s*num_versions\s*:\s*(\d+)", cfg.read_text())
    if not m:
        raise RepositoryError(f"{cfg} has no version_policy {{ latest {{ num_versions: N }} }}")
    return int(m.group(1))


def prune(model_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` versions; returns the removed dirs."""
    removed = []
    for v in versions(model_dir)[:-keep]:
        shutil.rmtree(Path(model_dir) / str(v))
        removed.append(Path(model_dir) / str(v))
    return removed


def read_parameters(config: str | Path) -> dict[str, Any]:
    """A config.pbtxt's `parameters` as Triton hands them to model.py (model_config["parameters"])."""
    pairs = re.findall(r'key: "(\w+)" value: \{ string_value: "((?:[^"\\]|\\.)*)" \}', Path(config).read_text())
    # protobuf text format escapes \" and \\ inside strings (class_names is a JSON list)
    return {"parameters": {k: {"string_value": re.sub(r'\\(.)', r'\1', v)} for k, v in pairs}}


def set_parameter(config: str | Path, key: str, value: Any) -> None:
    """Set one existing `parameters` entry of a config.pbtxt (benchmarks and tests tune copies this way)."""
    config = Path(config)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')  # protobuf text format
    text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"(?:[^"\\]|\\.)*"',
                      lambda m: f'{m.group(1)}"{escaped}"', config.read_text())
    if n != 1:
        raise RepositoryError(f"parameter {key!r} not found in {config}")
    config.write_text(text)


# ---- what the server accepts --------------------------------------------------------------------

def served_purification(settings: Any, profile: str = DEFAULT_PROFILE) -> dict[str, Any]:
    """What a card of `profile` must have been measured with to be served: that profile's t_star / sampler /
    num_inference_steps and the served max_votes (the card must have attacked that many VOTES, dbp.card).

    `settings`: the purifier's dbp.serving.contract.PurifierSettings (its config.pbtxt, parsed). The one place
    this dict is built: the server (dbp.serving.services), check_version, training.verify / training.profiles
    and the gate (through purification_settings) all check a card against it. KeyError for an undeclared
    profile."""
    return {**settings.profile_table()[profile].purification, "max_votes": int(settings.max_votes)}


def purifier_settings(repo: str | Path) -> Any:
    """The purifier's config.pbtxt parameters as the server parses them (dbp.serving.contract.PurifierSettings);
    RepositoryError for a malformed one."""
    from .serving.contract import PurifierSettings, parse_parameters

    try:
        return parse_parameters(PurifierSettings, read_parameters(model_dir(repo, "purifier") / CONFIG_FILE))
    except ValueError as e:
        raise RepositoryError(f"{model_dir(repo, 'purifier') / CONFIG_FILE}: {e}") from None


def purification_settings(repo: str | Path, profile: str = DEFAULT_PROFILE) -> dict[str, Any]:
    """served_purification of the repository's purifier config.pbtxt: the profile's t_star / sampler /
    num_inference_steps and max_votes, as the server will run them (KeyError for an undeclared profile)."""
    return served_purification(purifier_settings(repo), profile)


def profile_settings(repo: str | Path) -> dict[str, dict[str, Any]]:
    """{profile: {t_star, sampler, num_inference_steps}} the purifier's config.pbtxt declares, "default" first
    (parsed and checked by dbp.serving.contract.parse_profiles); RepositoryError for a malformed one."""
    return {name: p.purification for name, p in purifier_settings(repo).profile_table().items()}


def card_path(version: str | Path, profile: str = DEFAULT_PROFILE) -> Path:
    """Where a version dir keeps the card of a serving profile: CARD_FILE for "default", cards/<profile>.json else."""
    if profile == DEFAULT_PROFILE:
        return Path(version) / CARD_FILE
    from .serving.contract import _PROFILE_NAME

    if not _PROFILE_NAME.match(profile):
        raise RepositoryError(f"bad profile name {profile!r}")
    return Path(version) / CARDS_DIR / f"{profile}.json"


def check_version(version: str | Path, role: str, purification: Optional[Mapping[str, Any]] = None, *,
                  profile: str = DEFAULT_PROFILE, card: str | Path | None = None) -> dict[str, Any]:
    """The card of a version dir, if it is signed by a trusted key, passes the pinned policy when its verdict is
    recomputed from its evidence (dbp.gate.verdict), and was computed on exactly this version's weights and
    meta.json with the purification settings the server runs (`purification`, from its config.pbtxt; default:
    the model dir's config.pbtxt for a purifier). The result carries `gate_status` ("passed" or "legacy").

    The server refuses anything else, so a directory copied in by hand cannot bypass export's check. The one
    exception is the repository's legacy list (LEGACY_FILE): a version listed there with its card's exact
    sha256, the rules it fails, an approver and an expiry date keeps serving until that date, reported as
    "legacy" (never as passed). Export never consults the list.

    `profile`: a serving profile of the purifier (config.pbtxt `profiles`): the same rule for its card
    (card_path: cards/<profile>.json) bound to that profile's settings; a legacy entry names its profile
    ("profile", absent = "default"). `card`: check this card file instead of the one in the version dir (what
    `python -m training.profiles add` does before it copies a card in).

    `gate_status["card_sha256"]` is the sha256 of the very bytes that were checked (the file is read once), which
    the purifier answers per row (CARD_SHA256) so a receipt can show that it describes this card.
    """
    import hashlib

    from .card import CardError, card_bound_to, card_passes_for, read_card

    version = Path(version)
    path = Path(card) if card is not None else card_path(version, profile)
    what = "" if profile == DEFAULT_PROFILE else f" (profile {profile!r})"
    if purification is None and role == "purifier" and (version.parent / CONFIG_FILE).exists():
        try:
            purification = purification_settings(version.parent.parent, profile)
        except KeyError:
            raise RepositoryError(f"{version}: the purifier's config.pbtxt declares no profile {profile!r}") from None
    try:
        loaded, raw = read_card(path)
    except CardError as e:
        hint = ("publish versions with `python -m training.export`" if profile == DEFAULT_PROFILE else
                f"attach one with `python -m training.profiles add --version {version.name} --profile {profile}`")
        raise RepositoryError(f"{version}{what}: {e}; {hint}") from None
    sha = hashlib.sha256(raw).hexdigest()
    ok, reason = card_passes_for(loaded, {role: version / WEIGHTS_DIR}, purification)
    if ok:
        return {**loaded, "gate_status": {"status": "passed", "detail": reason, "card_sha256": sha}}
    entry = legacy_entry(version, role, card=path, profile=profile, card_sha256=sha)
    if entry is None:
        raise RepositoryError(f"{version}{what}: refusing to serve: {reason}")
    bound, why = card_bound_to(loaded, {role: version / WEIGHTS_DIR}, purification)
    if not bound:  # a legacy card still describes exactly these weights and settings
        raise RepositoryError(f"{version}{what}: refusing to serve: {why}")
    return {**loaded, "gate_status": {"status": "legacy", **entry, "detail": reason}}


def has_weights(model_dir: str | Path) -> bool:
    """Whether some numbered version of the model holds a weights/ dir (an optional model without one is not
    served: the launcher and the Triton image leave it out of the repository Triton sees)."""
    return any((Path(model_dir) / str(v) / WEIGHTS_DIR).is_dir() for v in versions(model_dir))


def unservable_optional_models(repo: str | Path) -> list[str]:
    """The OPTIONAL_MODELS present in `repo` (a config.pbtxt) that no version with weights backs yet."""
    return [m for m in OPTIONAL_MODELS
            if (model_dir(repo, m) / CONFIG_FILE).exists() and not has_weights(model_dir(repo, m))]


def check_certify_version(version: str | Path, classifier_weights: str | Path) -> dict[str, Any]:
    """The certification card of a certify version dir, if its binding names exactly this version's denoiser
    weights and `classifier_weights` (sha256 of the served weights file, dbp.checkpoint.weights_sha256, as
    experiments.certify.card binds them); RepositoryError otherwise, so the server refuses the version."""
    from .checkpoint import weights_sha256

    version = Path(version)
    path = version / CERTIFY_CARD_FILE
    try:
        card = json.loads(path.read_text())
        bind = card["binding"]
        want = {"denoiser": bind["unet_sha256"], "classifier": bind["classifier_sha256"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RepositoryError(f"{version}: refusing to serve: no readable certification card {path.name} with a "
                              f"binding (unet_sha256, classifier_sha256): {type(e).__name__}: {e}; write it with "
                              "`python -m experiments.certify.card` and copy its card.json there") from None
    for what, d in (("denoiser", version / WEIGHTS_DIR), ("classifier", Path(classifier_weights))):
        actual = weights_sha256(d)
        if actual != want[what]:
            raise RepositoryError(f"{version}: refusing to serve: the {what} weights in {d} (sha256 {actual[:12]}...) "
                                  f"are not the weights {path.name} was computed on (sha256 {str(want[what])[:12]}...)")
    return card


def legacy_entry(version: str | Path, role: str, today: Optional[str] = None, *, card: str | Path | None = None,
                 profile: str = DEFAULT_PROFILE, card_sha256: Optional[str] = None) -> Optional[dict]:
    """The repository's legacy-list entry for this version, profile and card, if one stands and has not expired.

    `card`: the card file whose sha256 the entry must name (default: the profile's card_path in the version dir);
    `card_sha256`: that sha256 already computed from the bytes the caller checked (the file is then not read again);
    an entry without "profile" is the "default" profile's."""
    import datetime
    import hashlib

    version = Path(version)
    repo = version.parent.parent
    try:
        listed = json.loads((repo / LEGACY_FILE).read_text())
        card_sha = card_sha256 or hashlib.sha256(
            Path(card if card is not None else card_path(version, profile)).read_bytes()).hexdigest()
    except (OSError, json.JSONDecodeError):
        return None
    today = today or datetime.date.today().isoformat()
    for e in listed.get("versions", []) if isinstance(listed, dict) else []:
        if not isinstance(e, dict) or e.get("model") != role or str(e.get("version")) != version.name:
            continue
        if e.get("profile", DEFAULT_PROFILE) != profile:
            continue
        complete = all(e.get(k) for k in ("card_sha256", "failed_rules", "approver", "expires"))
        if complete and e["card_sha256"] == card_sha and str(e["expires"]) >= today:
            return {k: e[k] for k in ("failed_rules", "approver", "expires", "card_sha256")}
    return None


def serving_weights(ckpt_dir: str | Path) -> Path:
    """The file dbp.checkpoint.weights_sha256 hashes and load_weights("ema") reads: EMA, else raw weights."""
    for name in ("ema.safetensors", "model.safetensors"):
        if (Path(ckpt_dir) / name).exists():
            return Path(ckpt_dir) / name
    raise RepositoryError(f"{ckpt_dir} has neither ema.safetensors nor model.safetensors")


def ensure_bytecode(model_py: str | Path) -> bool:
    """Write a valid __pycache__/*.pyc beside a version's model.py unless one exists; True if written.

    The python backend stub imports model.py without honouring PYTHONDONTWRITEBYTECODE, and the .pyc it
    writes changes the version dir; a polling tritonserver takes that for a new version and reloads the
    model (a second torch start-up) on its first poll. With a valid .pyc present the stub writes nothing.
    Must run with the Python the stub embeds (the venv's), as the .pyc name and magic are per version.
    """
    import importlib.util
    import py_compile
    import struct

    src = Path(model_py)
    pyc = Path(importlib.util.cache_from_source(str(src)))
    st = src.stat()
    try:
        head = pyc.read_bytes()[:16]
        magic, flags, mtime, size = head[:4], *struct.unpack("<3I", head[4:16])
        if (magic == importlib.util.MAGIC_NUMBER and flags == 0 and mtime == int(st.st_mtime) & 0xFFFFFFFF
                and size == st.st_size & 0xFFFFFFFF):
            return False
    except (OSError, struct.error, ValueError):
        pass
    py_compile.compile(str(src), cfile=str(pyc), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return True


# ---- publishing -----------------------------------------------------------------------------------

@contextmanager
def repo_lock(repo: str | Path):
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


def build_version(tmp: Path, model_dir: Path, ckpt_dir: Path, card_path: Path, provenance: Mapping,
                  extra_dirs: tuple[Path, ...] = ()) -> None:
    """One version dir under a temporary name: the shell, the serving weights, the card, the provenance, and
    `extra_dirs` copied in by name (the purifier's engine/: ONNX file + its binding, dbp.serving.engines)."""
    from . import checkpoint as ckpt

    template = model_dir / MODEL_FILE
    if not template.exists():
        raise RepositoryError(f"no {MODEL_FILE} template at {template}")
    (tmp / WEIGHTS_DIR).mkdir(parents=True)
    shutil.copy2(template, tmp / MODEL_FILE)
    ensure_bytecode(tmp / MODEL_FILE)  # else the stub's own .pyc looks like a new version to a polling server
    meta = ckpt.load_meta(ckpt_dir)
    meta.pop("optimizer", None)  # optimizer state has no business in a serving artifact
    (tmp / WEIGHTS_DIR / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    src = serving_weights(ckpt_dir)
    shutil.copy2(src, tmp / WEIGHTS_DIR / src.name)
    shutil.copy2(card_path, tmp / CARD_FILE)
    (tmp / EXPORT_FILE).write_text(json.dumps(provenance, indent=2))
    for d in extra_dirs:
        shutil.copytree(d, tmp / Path(d).name)
    if ckpt.weights_sha256(tmp / WEIGHTS_DIR) != ckpt.weights_sha256(ckpt_dir):
        raise RepositoryError(f"copy of {src} does not hash like the original")
    _fsync_tree(tmp)


def relative_path(p: str | Path | None) -> Optional[str]:
    """A provenance path relative to the checkout (or the working directory), never an absolute machine path."""
    if p is None:
        return None
    p = Path(p).resolve()
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        try:
            return str(p.relative_to(root))
        except ValueError:
            continue
    return p.name


def relative_paths(record: dict) -> dict:
    """`record` (a CLI's arguments, a config) with every absolute path made relative_path: what a JSON committed
    as evidence may say about where its inputs were."""
    return {k: relative_path(v) if isinstance(v, (str, Path)) and Path(v).is_absolute() else v
            for k, v in record.items()}


def publish(repo: str | Path, sources: Mapping[str, Path], card_path: Path,
            provenance: Mapping[str, Any] | None = None, log=print,
            extra_dirs: Mapping[str, tuple[Path, ...]] | None = None) -> int:
    """Add sources[role] (checkpoint dirs, already checked) as version N of each role; returns N.

    One number for the pair, so purifier/N and classifier/N were exported (and gated) together. Each
    version dir is built under a hidden temporary name and renamed into place, so a polling Triton never
    sees half a version; versions beyond the config's `latest { num_versions }` are pruned.
    """
    import time

    from . import checkpoint as ckpt
    from .revision import git_commit

    repo = Path(repo)
    check_layout(repo)
    dirs = {role: model_dir(repo, role) for role in sources}
    with repo_lock(repo):
        for d in dirs.values():  # leftovers of a killed export; safe under the lock
            for t in d.glob(TMP_PREFIX + "*"):
                shutil.rmtree(t, ignore_errors=True)
        version = max([0] + [v for role in ROLES for v in versions(model_dir(repo, role))]) + 1
        prov = {"version": version, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
                "card": relative_path(card_path),
                "sources": {r: {"dir": relative_path(p), "sha256": ckpt.weights_sha256(p)} for r, p in sources.items()},
                **(provenance or {})}
        tmps = {r: d / f"{TMP_PREFIX}{version}-{secrets.token_hex(4)}" for r, d in dirs.items()}
        try:
            for role, tmp in tmps.items():
                build_version(tmp, dirs[role], Path(sources[role]), Path(card_path), prov,
                              tuple((extra_dirs or {}).get(role, ())))
            # classifier first: a server that polls in between pairs the old purifier with the new
            # classifier for a moment rather than a new purifier with an old classifier
            for role in sorted(tmps, key=lambda r: r != "classifier"):
                os.rename(tmps[role], dirs[role] / str(version))
                _fsync_dir(dirs[role])
        finally:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)
        for d in dirs.values():
            keep = num_versions_kept(d)
            for p in prune(d, keep):
                log(f"removed {p} (version_policy keeps {keep})")
    for d in dirs.values():
        log(f"exported {d / str(version)}")
    return version
