"""The runner's eager form (`compiling.in_eager_form`): oneDNN's product in a twin of the model,
equal to the model's own forward within rounding, sharing its weights and hooks; the model's
own forward keeps the reference's product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoengine import load_model
from nanoengine.engine.compiling import ONEDNN_FROM, in_eager_form, onednn_linear
from nanoengine.model.decoder import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def test_the_eager_form_multiplies_with_onednn_and_the_model_keeps_the_reference_product(tmp_path):
    """Projections of `ONEDNN_FROM` values or more (here the head, 8,192 x 64) take oneDNN's
    product in the twin, smaller ones keep MKL's; the model keeps the reference's everywhere."""
    from conftest import save_tiny_llama

    model = load_model(save_tiny_llama(tmp_path / "tiny", vocab_size=8192))
    fast = in_eager_form(model)
    assert fast is not model and in_eager_form(model) is fast  # made once per model
    big = {name for name, m in model.named_modules() if isinstance(m, Linear) and m.weight.numel() >= ONEDNN_FROM}
    assert big == {"lm_head"}
    for name, m in fast.named_modules():
        if isinstance(m, Linear):
            assert m.product is (onednn_linear if name in big else F.linear)
    assert all(m.product is F.linear for m in model.modules() if isinstance(m, Linear))
    ids = torch.randint(3, 8000, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(fast(ids), model(ids), rtol=0, atol=1e-5)


def test_the_eager_form_shares_weights_and_hooks_made_after_it(tiny_llama_folder):
    """Interventions hook the model's modules and edit its weights while an engine runs its twin."""
    model = load_model(tiny_llama_folder)
    fast = in_eager_form(model)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = fast(ids)
        handle = model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 0)
        ablated = fast(ids)
        assert torch.allclose(ablated, model(ids), rtol=0, atol=1e-5) and not torch.allclose(ablated, plain)
        handle.remove()
        model.model.layers[1].mlp.down_proj.weight.mul_(2)  # the same tensor in both
        assert torch.allclose(fast(ids), model(ids), rtol=0, atol=1e-5) and not torch.allclose(fast(ids), plain)
