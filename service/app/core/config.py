"""Gateway settings: environment variables with the prefix DBP_GATEWAY_ (e.g. DBP_GATEWAY_TRITON_URLS).

Bad values fail at start-up with a message naming the variable; nothing here is read per request.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "DBP_GATEWAY_"


def _parse_url(raw: str) -> str:
    url = raw.strip()
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    host, sep, port = url.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{raw!r} is not a gRPC host:port address (e.g. 127.0.0.1:8001)")
    return f"{host}:{int(port)}"


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected API_KEY or SEED_SECRET must not be echoed in a traceback either
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore",
                                      case_sensitive=False, hide_input_in_errors=True)

    # --- where Triton is ---------------------------------------------------------------------------
    TRITON_URLS: Annotated[list[str], NoDecode] = Field(
        default=["127.0.0.1:8001"],
        description="comma-separated gRPC host:port list; requests go to the ready ones in turn")
    PURIFIER_MODEL: str = "purifier"
    CLASSIFIER_MODEL: str = "classifier"
    ENSEMBLE_MODEL: str = Field("purify_classify", description="its config `parameters` describe the pair's "
                                "interface (image_shape, class_names); the gateway calls the two models itself")
    CERTIFY_MODEL: str = Field("certify", description="the certified-radius model (POST /certify); absent from "
                               "Triton: /certify answers 503, everything else is served")
    MODEL_REPOSITORY: Optional[Path] = Field(None, description="read-only; robustness card summary per version")

    # --- time --------------------------------------------------------------------------------------
    REQUEST_TIMEOUT_S: float = Field(60.0, gt=0, le=3600, description="budget for all Triton calls of a request")
    ONE_CALL: bool = Field(True, description="/classify as one call to the ensemble, its answer checked to come from "
                           "the pinned pair (else the two pinned calls); false: always purifier/N then classifier/N")
    PROBE_INTERVAL_S: float = Field(2.0, gt=0, le=300, description="readiness probe of every Triton URL")
    PROBE_TIMEOUT_S: float = Field(2.0, gt=0, le=60)
    RETRY_AFTER_S: int = Field(2, ge=1, le=3600, description="Retry-After of 429/503 answers")

    # --- limits ------------------------------------------------------------------------------------
    MAX_IN_FLIGHT: int = Field(32, ge=1, le=100_000, description="concurrent /classify + /purify; more get 429")
    MAX_BODY_BYTES: int = Field(10 * 1024 * 1024, ge=1024, le=1 << 31)
    MAX_PIXELS: int = Field(4_194_304, ge=1, le=1 << 31, description="per image (2048x2048 by default), checked "
                            "before decoding: a decoded image costs up to 4 bytes per pixel")
    MAX_IMAGES: int = Field(16, ge=1, le=4096, description="per request (also capped by Triton's max_batch_size)")
    MAX_VOTES: int = Field(16, ge=1, le=1024, description="upper bound; the models' own max_votes may be lower")
    # --- /certify (randomized smoothing): defaults of n, alpha, sigma; the model's max_n may be lower ------
    CERTIFY_N: Optional[int] = Field(None, ge=1, le=1_000_000, description="default n (estimation samples per "
                                     "image); unset: the certify model's `n`, the one its card was measured at")
    CERTIFY_MAX_N: int = Field(100_000, ge=1, le=1_000_000, description="upper bound of n; the certify model's "
                               "max_n parameter may be lower (then that is the limit)")
    CERTIFY_ALPHA: float = Field(0.001, gt=0, lt=0.5, description="default alpha")
    CERTIFY_SIGMA: Optional[float] = Field(None, gt=0, description="default sigma; unset: the first of the certify "
                                           "model's sigmas")

    # --- access ------------------------------------------------------------------------------------
    API_KEY: Optional[SecretStr] = Field(None, description="when set, /classify and /purify need X-API-Key")

    # --- noise seeds (threat model: service/README.md) ---------------------------------------------------
    SEED_SECRET: Optional[SecretStr] = Field(None, description="HMAC key turning client seeds into noise seeds; "
                                             "one value for every replica; unset: a random key per process")
    ALLOW_CLIENT_SEED: bool = Field(True, description="false: a request with `seed` is refused (422), every "
                                    "image gets fresh noise")

    # --- the process -------------------------------------------------------------------------------
    HOST: str = "127.0.0.1"
    PORT: int = Field(8080, ge=0, le=65535, description="0 = any free port (printed at start-up)")
    LOG_LEVEL: str = "info"
    SAMPLES_DIR: Optional[Path] = Field(None, description="test images the demo page offers; default: the bundled")

    @field_validator("TRITON_URLS", mode="before")
    @classmethod
    def _split_urls(cls, v):
        if isinstance(v, str):
            v = [p for p in v.split(",") if p.strip()]
        if not v:
            raise ValueError("at least one Triton gRPC URL is needed")
        return v

    @field_validator("TRITON_URLS")
    @classmethod
    def _check_urls(cls, v: list[str]) -> list[str]:
        urls = [_parse_url(u) for u in v]
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate Triton URL in {urls}")
        return urls

    @field_validator("API_KEY")
    @classmethod
    def _check_key(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("API_KEY must be at least 16 characters (or unset to disable the check)")
        return v

    @field_validator("SEED_SECRET")
    @classmethod
    def _check_seed_secret(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        # the message must not quote the value: it is printed at start-up
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("SEED_SECRET must be at least 32 characters, e.g. `openssl rand -hex 32` (or unset: "
                             "a random key per process)")
        return v

    @field_validator("MODEL_REPOSITORY", "SAMPLES_DIR")
    @classmethod
    def _check_dir(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a directory")
        return v

    @field_validator("LOG_LEVEL")
    @classmethod
    def _check_level(cls, v: str) -> str:
        if v.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"unknown log level {v!r}")
        return v.lower()

    @model_validator(mode="after")
    def _check_budget(self) -> "Settings":
        if self.PROBE_TIMEOUT_S > self.PROBE_INTERVAL_S * 10:
            raise ValueError("PROBE_TIMEOUT_S should not exceed 10x PROBE_INTERVAL_S")
        return self


def load_settings() -> Settings:
    """Settings from the environment, or SystemExit with one line per bad variable."""
    from pydantic import ValidationError
    try:
        return Settings()
    except ValidationError as e:
        lines = [f"  {ENV_PREFIX}{'.'.join(str(p) for p in err['loc']) or '?'}: {err['msg']}" for err in e.errors()]
        raise SystemExit("error: bad gateway settings:\n" + "\n".join(lines)) from None
