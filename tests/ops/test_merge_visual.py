"""vlmopt::merge_visual against HF's masked_scatter, gradients, errors."""

import torch

from vlmopt.ops.merge_visual import merge_visual


def random_case(generator, batch=2, seq=9, dim=5, visual=6):
    embeds = torch.randn(batch, seq, dim, generator=generator)
    slots = torch.randperm(batch * seq, generator=generator)[:visual].sort().values
    features = torch.randn(visual, dim, generator=generator)
    return embeds, features, slots


def test_matches_masked_scatter():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        embeds, features, slots = random_case(generator)
        mask = torch.zeros(embeds.shape[0] * embeds.shape[1], dtype=torch.bool)
        mask[slots] = True
        expected = embeds.masked_scatter(mask.view(*embeds.shape[:2], 1), features)
        assert torch.equal(merge_visual(embeds, features, slots), expected)


def test_does_not_mutate_and_casts():
    generator = torch.Generator().manual_seed(1)
    embeds, features, slots = random_case(generator)
    before = embeds.clone()
    out = merge_visual(embeds.half(), features, slots)
    assert out.dtype == torch.float16
    assert torch.equal(embeds, before)


def test_count_mismatch_is_an_error():
    generator = torch.Generator().manual_seed(2)
    embeds, features, slots = random_case(generator)
    try:
        merge_visual(embeds, features[:-1], slots)
    except ValueError as error:
        assert "placeholder slots" in str(error)
    else:
        raise AssertionError("expected a ValueError")


def test_opcheck_and_gradients():
    generator = torch.Generator().manual_seed(3)
    embeds, features, slots = random_case(generator)
    embeds, features = embeds.double().requires_grad_(), features.double().requires_grad_()
    torch.library.opcheck(torch.ops.vlmopt.merge_visual.default, (embeds, features, slots))
    assert torch.autograd.gradcheck(lambda e, f: merge_visual(e, f, slots), (embeds, features))
