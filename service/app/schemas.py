"""Request and response models (they are the OpenAPI schema; every one carries an example)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# a 1x1 black PNG: a valid image for examples and "try it out"
TINY_PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==")
SEED_MAX = 2**63 - 1
CARD_SHA256_DOC = ("sha256 of the robustness card the server checked when it loaded the purifier version, for this "
                   "profile, as the purifier answered it on every row (null when the served model does not report "
                   "it, or its rows disagree); the robustness summary shows a card's figures only if it is that card")
SEED_DOC = ("this image's seed (the request's seed + index, or drawn by the gateway), never the noise seed "
            "derived from it with the server secret; the same seed and image repeat the answer on this deployment")


class ImagesJSON(BaseModel):
    """JSON form of the image upload: base64-encoded PNG/JPEG/WebP files (plain or as data: URLs)."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": [TINY_PNG_B64]}]})
    images: list[str] = Field(..., min_length=1, description="base64 image files, or data:image/...;base64,... URLs")
    filenames: Optional[list[str]] = Field(None, description="optional names echoed back, one per image")


class InputInfo(BaseModel):
    filename: str = Field(..., examples=["shirt.png"])
    format: str = Field(..., examples=["PNG"])
    width: int = Field(..., examples=[28])
    height: int = Field(..., examples=[28])
    mode: str = Field(..., description="Pillow pixel mode of the upload", examples=["L"])
    converted: bool = Field(..., description="whether the image was converted to the model's mode and size")
    conversions: list[str] = Field(..., examples=[["padded 28x28 -> 32x32 with black, centred"]])


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str = Field(..., examples=["purify_classify"])
    purifier_version: int = Field(..., examples=[2])
    classifier_version: Optional[int] = Field(None, examples=[2], description="null for /purify")
    input_shape: list[int] = Field(..., description="[C, H, W] the models take", examples=[[1, 32, 32]])
    class_names: Optional[list[str]] = Field(None, examples=[["T-shirt/top", "Trouser"]])


class Purification(BaseModel):
    sampler: Optional[str] = Field(None, examples=["ddim"])
    num_inference_steps: Optional[int] = Field(None, examples=[100])
    t_star: Optional[int] = Field(None, description="diffusion time the input is noised to", examples=[100])


class ServingProfile(BaseModel):
    name: str = Field(..., description="the serving profile the request ran (query parameter `profile`; "
                      "'default' when none was given)", examples=["fast"])
    settings: Purification = Field(..., description="the purification settings that profile pins")


class RobustAccuracy(BaseModel):
    setting: str = Field(..., examples=["linf-dwbox"])
    description: Optional[str] = Field(None, examples=["DW-box (noise fixed per batch, plain PGD)"])
    mode: Optional[str] = Field(None, description="dwbox (noise fixed per batch) or eot (fresh noise, the "
                                "served setting)", examples=["eot"])
    threat_model: Optional[str] = Field(None, examples=["linf"])
    eps: Optional[float] = Field(None, examples=[0.0314])
    n: Optional[int] = Field(None, examples=[64])
    robust_accuracy: Optional[float] = Field(None, description="the gate's figure: the worst case over the "
                                             "attacks that ran (schema 2 cards), else the single attack's",
                                             examples=[0.578])
    ci95: Optional[list[float]] = Field(None, examples=[[0.456, 0.691]])
    expected_robust_accuracy: Optional[float] = Field(None, description="expected over k purifications, where "
                                                      "the card has it", examples=[0.61])
    votes: Optional[int] = Field(None, description="VOTES of the attacked defence (k > 1: the attack "
                                 "differentiated the mean probabilities of k purifications, the outcome is the "
                                 "majority label)", examples=[1])
    declared: Optional[bool] = Field(None, description="a threat model the product claims to defend (else only "
                                     "reported: not defended at this budget)", examples=[True])
    claim: Optional[str] = Field(None, description="what the figure claims, in words")


class RobustnessSummary(BaseModel):
    gate: str = Field("unverified", description="the server's decision on this version's card: 'passed' (signed by "
                      "a trusted gate key, passes the pinned promotion policy recomputed from its per-image "
                      "evidence), 'legacy' (served under the repository's legacy list, failing the rules in "
                      "failed_rules, until legacy_expires), 'unverified' (no card could be read), 'card_mismatch' "
                      "(the card the gateway read is not the one the server checked when it loaded the version, see "
                      "card_binding: its figures are withheld)",
                      examples=["passed"])
    card_binding: Optional[str] = Field(None, description="'verified': the server answered, on every row, the sha256 "
                                        "of this very card (the one it checked at load), so the figures describe what "
                                        "served the request; 'unchecked': the served model does not report which card "
                                        "it checked (a model config older than CARD_SHA256), the figures are the "
                                        "gateway's reading of the model repository; 'mismatch': it reported another "
                                        "card, or not the same one on every row (the file changed after the load, or "
                                        "the gateway reads another repository than Triton): gate is 'card_mismatch' "
                                        "and only the two sha256 are given", examples=["verified"])
    card_sha256: Optional[str] = Field(None, description="sha256 of the card file this summary was read from by the "
                                       "gateway")
    served_card_sha256: Optional[list[str]] = Field(None, description="card_mismatch only: the distinct sha256 the "
                                                    "server answered for the rows (its card_sha256 when one)")
    failed_rules: Optional[list[str]] = Field(None, description="legacy versions: the rules their card fails")
    legacy_expires: Optional[str] = Field(None, examples=["2027-01-31"])
    legacy_approver: Optional[str] = None
    policy_sha256: Optional[str] = Field(None, description="the promotion policy the card passed")
    signed_by: Optional[str] = Field(None, description="id of the gate key that signed the card")
    dataset: Optional[str] = Field(None, examples=["fashion_mnist"])
    n: Optional[int] = Field(None, examples=[64])
    clean_accuracy: Optional[float] = Field(None, examples=[0.906])
    clean_ci95: Optional[list[float]] = Field(None, examples=[[0.81, 0.956]])
    settings: list[RobustAccuracy] = Field(default_factory=list)
    votes_attacked: Optional[list[int]] = Field(None, description="the VOTES values the gate attacked (the default "
                                                "and the served maximum)", examples=[[1, 16]])


class Timings(BaseModel):
    total_ms: float = Field(..., description="gateway time for the whole request", examples=[143.2])
    triton_ms: float = Field(..., description="time spent in Triton calls", examples=[131.7])
    decode_ms: float = Field(..., description="image decoding and conversion", examples=[1.4])


class Prediction(BaseModel):
    index: int = Field(..., description="position of the image in the request", examples=[0])
    label: int = Field(..., examples=[3])
    class_name: str = Field(..., examples=["Dress"])
    probabilities: dict[str, float] = Field(..., description="mean class probability over the votes",
                                            examples=[{"T-shirt/top": 0.02, "Dress": 0.91}])
    agreement: Optional[float] = Field(None, description="share of the votes for `label` (only when votes > 1)",
                                       examples=[0.8])
    seed: int = Field(..., description=SEED_DOC, examples=[1234])
    input: InputInfo


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: ModelInfo
    purification: Purification
    profile: ServingProfile
    robustness: Optional[RobustnessSummary] = Field(None, description="the robustness card of the deployed version "
                                                    "for this profile (null when the gateway has no model "
                                                    "repository to read)")
    card_sha256: Optional[str] = Field(None, description=CARD_SHA256_DOC)
    votes: int = Field(..., examples=[1])
    predictions: list[Prediction]
    timings: Timings


class PurifiedImage(BaseModel):
    index: int = Field(..., examples=[0])
    seed: int = Field(..., description=SEED_DOC, examples=[1234])
    width: int = Field(..., examples=[32])
    height: int = Field(..., examples=[32])
    mode: str = Field(..., examples=["L"])
    png_base64: str = Field(..., examples=[TINY_PNG_B64])
    input: InputInfo


class PurifyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: ModelInfo
    purification: Purification
    profile: ServingProfile
    robustness: Optional[RobustnessSummary] = None
    card_sha256: Optional[str] = Field(None, description=CARD_SHA256_DOC)
    images: list[PurifiedImage]
    timings: Timings


class Problem(BaseModel):
    """application/problem+json (RFC 9457)."""
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "type": "https://dbp.invalid/problems/bad_image", "title": "Unsupported Media Type", "status": 415,
        "detail": "image upload.txt: not a recognised image file (PNG, JPEG or WebP expected)",
        "reason": "bad_image", "instance": "/classify"}]})
    type: str
    title: str
    status: int
    detail: str
    reason: str = Field(..., description="machine-readable cause (the label of dbp_gateway_rejections_total)")
    instance: Optional[str] = None


class BackendState(BaseModel):
    url: str = Field(..., examples=["127.0.0.1:8001"])
    ready: bool
    reason: str = Field(..., examples=["ok"])
    version_pair: Optional[int] = Field(None, examples=[2])
    ensemble_ready: bool = False


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ready", "detail": "1 of 1 Triton backends ready",
        "backends": [{"url": "127.0.0.1:8001", "ready": True, "reason": "ok", "version_pair": 2,
                      "ensemble_ready": True}]}]})
    status: Literal["ready", "not ready"]
    detail: str
    backends: list[BackendState]


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Sample(BaseModel):
    name: str = Field(..., examples=["fashion-0-ankle-boot.png"])
    url: str = Field(..., examples=["/demo/samples/fashion-0-ankle-boot.png"])


# ---- POST /certify ----------------------------------------------------------------------------------------

CERTIFY_CLAIM = ("l_2 only: the smoothed classifier g (this sigma, n, alpha) answers `class_name` at every input "
                 "within l_2 distance `radius` of this image (pixels in [0, 1], the norm over all pixels), with "
                 "probability >= 1 - alpha over the noise drawn for this answer; no other threat model")
NOT_CLAIMED = ["any other threat model: l_inf (beyond the l_2 ball it contains: eps * sqrt(pixels)), patches, "
               "transformations", "a radius larger than `radius`", "g's answer at another n, alpha or sigma",
               "other weights or preprocessing (a different denoiser or classifier is a different g)",
               "repeated requests: alpha is per certificate, k tries can find a wrong one with probability up to "
               "k * alpha"]


class CertifyModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str = Field(..., examples=["certify"])
    version: int = Field(..., examples=[1])
    classifier_version: Optional[int] = Field(None, description="the classifier version g uses", examples=[2])
    input_shape: list[int] = Field(..., examples=[[1, 32, 32]])
    class_names: Optional[list[str]] = Field(None, examples=[["T-shirt/top", "Trouser"]])
    sigmas: list[float] = Field(..., description="the noise levels served", examples=[[0.25, 0.5]])
    max_n: int = Field(..., description="the largest n this deployment accepts", examples=[2000])
    n0: int = Field(..., description="selection samples per image (fixed)", examples=[32])


class Certificate(BaseModel):
    index: int = Field(..., examples=[0])
    label: int = Field(..., description="the certified class, -1 = abstain", examples=[9])
    class_name: str = Field(..., description="the certified class's name, or 'abstain'", examples=["Ankle boot"])
    certified: bool = Field(..., description="false: abstained (p_lower <= 1/2), radius 0, nothing is claimed")
    radius: float = Field(..., description="certified l_2 radius in pixel units (images in [0, 1])",
                          examples=[0.5921])
    p_lower: float = Field(..., description="one-sided (1 - alpha) Clopper-Pearson lower bound of P(h = class)",
                           examples=[0.9911])
    count: int = Field(..., description="samples (of n) the selected class got", examples=[2000])
    counts: dict[str, int] = Field(..., description="estimation counts by class name", examples=[{"Ankle boot": 2000}])
    n: int = Field(..., examples=[2000])
    n0: int = Field(..., examples=[32])
    alpha: float = Field(..., examples=[0.001])
    sigma: float = Field(..., examples=[0.25])
    seed: int = Field(..., description=SEED_DOC, examples=[1234])
    seconds: float = Field(..., description="CERTIFY's time for this image inside Triton", examples=[4.2])
    certificate: str = Field(..., description="what this answer certifies, in words")
    input: InputInfo


class CertifiedAccuracyAt(BaseModel):
    radius: float = Field(..., examples=[0.5])
    accuracy: Optional[float] = Field(None, examples=[0.658])
    ci95: Optional[list[float]] = Field(None, examples=[[0.615, 0.698]])


class CertifyCardSummary(BaseModel):
    sigma: float = Field(..., examples=[0.25])
    images: Optional[int] = Field(None, examples=[500])
    n0: Optional[int] = Field(None, examples=[32])
    n: Optional[int] = Field(None, description="the card's n (the certified accuracy is for that n)", examples=[320])
    alpha: Optional[float] = Field(None, examples=[0.001])
    certified_accuracy: list[CertifiedAccuracyAt] = Field(default_factory=list)
    abstain: Optional[int] = None
    denoiser_sha256: Optional[str] = None
    classifier_sha256: Optional[str] = None
    claim: Optional[str] = None


class CertifyReceipt(BaseModel):
    certificate: Literal["l_2"] = Field("l_2", description="the only threat model certified")
    statement: str = Field(CERTIFY_CLAIM)
    not_claimed: list[str] = Field(default_factory=lambda: list(NOT_CLAIMED))
    sigma: float = Field(..., examples=[0.25])
    n: int = Field(..., examples=[2000])
    n0: int = Field(..., examples=[32])
    alpha: float = Field(..., examples=[0.001])
    seeds: str = Field("the noise seed of image i is HMAC(server secret, seed + i, image tensor): a client cannot "
                       "choose the noise")
    card: Optional[CertifyCardSummary] = Field(None, description="the version's certification card at this sigma "
                                               "(null when the gateway has no model repository to read)")


class CertifyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: CertifyModelInfo
    receipt: CertifyReceipt
    certificates: list[Certificate]
    timings: Timings
