"""Publish a purifier + classifier pair to the Triton model repository as a new numbered version.

  python -m training.export --purifier runs/diffusion/checkpoint --classifier runs/classifier/checkpoint \
      --card runs/gate/card.json [--repo model_repository]

Refuses unless the robustness card is signed by a trusted gate key, passes the pinned promotion policy when
its verdict is recomputed from its per-image evidence (dbp.gate.verdict; the card's `gate.passed` is never
read), was computed on exactly these weights, their meta.json and the repository's purification settings
(purifier/config.pbtxt), and, once a version is deployed, was compared with that version's weights. Each version dir is built under a hidden temporary name inside the model dir and
renamed into place, so a polling Triton never sees half a version. Only the serving weights travel (EMA
if present, else the raw weights; never the optimizer). Version dirs beyond the config's
`version_policy { latest { num_versions: N } }` are deleted: rolling back = deleting the newest dir.

The purifier's UNet is exported to ONNX too (purifier/<N>/engine/unet.onnx + engine.json binding its sha256 to
the card's weights), and export refuses when ONNX Runtime's or OpenVINO's eps differ from torch's by more than
dbp.serving.engines.TOLERANCE on fixed seeded inputs. `--attach_engine model_repository/purifier/2` adds the
same to a version exported before engines existed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from dbp import repository
from dbp.publish import ExportError, attach_engine, export


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--purifier", help="diffusion/ADDT checkpoint dir (meta.json + weights)")
    p.add_argument("--classifier", help="classifier checkpoint dir")
    p.add_argument("--card", help="robustness card JSON written by the gate for these weights")
    p.add_argument("--repo", default=repository.DEFAULT_REPO, help="Triton model repository (default: %(default)s)")
    p.add_argument("--onnx", default=None, help="ship this ONNX file of the purifier's UNet instead of exporting "
                   "one (refused unless every engine matches torch within dbp.serving.engines.TOLERANCE)")
    p.add_argument("--attach_engine", metavar="VERSION_DIR", default=None,
                   help="instead of exporting: add engine/ (ONNX + binding) to a purifier version exported before "
                        "engines existed, e.g. model_repository/purifier/2")
    a = p.parse_args(argv)
    try:
        if a.attach_engine:
            attach_engine(a.attach_engine)
            return 0
        if not (a.purifier and a.classifier and a.card):
            p.error("--purifier, --classifier and --card are required (or --attach_engine)")
        export(a.purifier, a.classifier, a.card, a.repo, onnx=a.onnx)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
