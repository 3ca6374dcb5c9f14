"""The ensemble config's interface parameters (what the gateway reads) must match the pair export publishes."""
from __future__ import annotations

import re

import pytest

from helpers import copy_repo_configs, write_card


@pytest.mark.parametrize("key, value, words", [
    ("image_shape", "3,32,32", "image_shape 3,32,32 but the purifier takes 1,32,32"),
    ("class_names", '[\\"cat\\", \\"dog\\"]', "names 2 classes but the classifier has 10 outputs"),
])
def test_export_refuses_a_pair_that_does_not_match_the_interface(tmp_path, tiny_diffusion_ckpt,
                                                                 tiny_classifier_ckpt, key, value, words):
    from dbp import publish
    repo = copy_repo_configs(tmp_path / "model_repository")
    cfg = repo / "purify_classify" / "config.pbtxt"
    text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"(?:[^"\\]|\\.)*"', lambda m: f'{m.group(1)}"{value}"',
                      cfg.read_text())
    assert n == 1
    cfg.write_text(text)
    card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
    with pytest.raises(publish.ExportError, match=re.escape(words)):
        publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo)
    assert not list((repo / "purifier").glob("[0-9]*"))  # nothing was published
