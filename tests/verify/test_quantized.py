"""``adapter_retained`` and ``adapter_effect_error`` (``verify.quantized``) as functions of the
adapter's effect and of quantization noise: the property that makes the first a gate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraexport.verify.quantized import adapter_figures, effect_sums


@settings(max_examples=60, deadline=None)
@given(
    st.floats(0.0, 2.0),
    st.floats(0.0, 3.0),
    st.integers(0, 2**31 - 1),
)
def test_retained_is_the_share_of_the_effect_whatever_the_noise(share, noise, seed):
    """``adapter_retained`` of an effect shown at ``share`` of its size plus quantization noise
    that does not follow it is ``share`` (the noise, even 3× the effect, cancels in the inner
    product); the effect error grows with the noise. Tolerance: over 200,000 independent
    normal values the noise's projection on the effect has a standard deviation of
    noise/sqrt(200,000) ≈ 0.007 at most; 0.05 is over 7 of them."""
    rng = np.random.default_rng(seed)
    true = rng.standard_normal(200_000)
    shown = share * true + noise * rng.standard_normal(true.size)
    retained, error = adapter_figures(effect_sums(shown, true))
    assert retained == pytest.approx(share, abs=0.05)
    assert error == pytest.approx(np.sqrt((1 - share) ** 2 + noise**2), abs=0.05)
    assert adapter_figures(effect_sums(shown, 0 * true)) == (None, None)  # no effect, no figure
