"""Every registered pass's lossless_settings() (and no pass at all) is bit-exact with Hugging Face:
logits (torch.equal) and greedy tokens, on a left-padded batch of two prompts."""

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch
from vlmopt.passes import REGISTRY

SETTINGS = [()] + [(setting,) for cls in REGISTRY.values() for setting in cls.lossless_settings()]


def test_settings_are_configs_of_their_pass():
    for cls in REGISTRY.values():
        for setting in cls.lossless_settings():
            assert type(setting) is cls and setting.is_lossless


@pytest.mark.parametrize("passes", SETTINGS, ids=lambda s: "+".join(p.spec() for p in s) or "no_passes")
def test_lossless_settings_are_bit_exact(family_model, passes):
    batch = padded_batch(family_model, seed=21)
    assert (batch["attention_mask"] == 0).any(), "the batch exercises left padding"
    compiled = vlmopt.compile(family_model, passes=list(passes))
    assert compiled.lossless
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, family_model(**batch).logits)
        expected = family_model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=6), expected)
