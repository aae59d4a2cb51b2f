"""Reference Transformer: KV-cache decoding equals full recomputation; masks; shapes."""

from __future__ import annotations

import pytest
import torch

from loraexport.models.transformer import Transformer, TransformerConfig, sinusoidal_positions

# Incremental vs full decoding in float32: the same math, but attention sums over a different
# number of keys per call and matmuls block differently, so logits (|x| ≲ 10) differ by a few
# ulps; 1e-5 absolute is ~100 ulps at that scale, while a wrong position offset or a causal-mask
# leak changes logits by O(0.1).
CACHE_ATOL = 1e-5
# Padding keys are masked to finfo.min before softmax, so their weight is exactly 0 and only the
# summation order differs: same margin as above.
PAD_ATOL = 1e-5

MODES = {
    "encoder-decoder": dict(n_encoder_layers=2, n_decoder_layers=2),
    "decoder-only": dict(n_encoder_layers=0, n_decoder_layers=2),
}
SPLITS = [[1] * 9, [3, 3, 3], [4, 1, 4], [2, 7], [9]]  # one token at a time, chunks, all at once


def _sequences(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 14, (n, length), generator=g)


def _full_logits(model: Transformer, src, src_mask, tgt) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(src, src_mask, tgt)
        return model(tgt)


def _incremental_logits(model: Transformer, src, src_mask, tgt, split: list[int]) -> torch.Tensor:
    assert sum(split) == tgt.shape[1]
    cross, enc_mask = None, None
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            cross, enc_mask = model.cross_kv(model.encode(src, src_mask)), src_mask
        past, out, start = None, [], 0
        for n in split:
            logits, past = model.decode(
                tgt[:, start : start + n], past=past, cross=cross, encoder_attention_mask=enc_mask
            )
            out.append(logits)
            start += n
            assert past[0][0].shape[2] == start  # the cache grows by exactly n positions
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("mode", list(MODES))
def test_kv_cache_equals_full_recomputation(mode, split, make_model):
    model = make_model(**MODES[mode])
    src = _sequences(3, 6, seed=1)
    src_mask = torch.ones_like(src)
    src_mask[0, 4:] = 0  # padded source row
    tgt = _sequences(3, 9, seed=2)
    full = _full_logits(model, src, src_mask, tgt)
    inc = _incremental_logits(model, src, src_mask, tgt, split)
    assert inc.shape == full.shape == (3, 9, model.config.vocab_size)
    torch.testing.assert_close(inc, full, rtol=0, atol=CACHE_ATOL)


@pytest.mark.parametrize("mode", list(MODES))
def test_decoder_is_causal(mode, make_model):
    model = make_model(**MODES[mode])
    src = _sequences(2, 5, seed=1)
    mask = torch.ones_like(src)
    tgt = _sequences(2, 8, seed=2)
    changed = tgt.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 14
    a, b = _full_logits(model, src, mask, tgt), _full_logits(model, src, mask, changed)
    assert torch.equal(a[:, :5], b[:, :5])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_source_padding_is_invisible(make_model):
    """A padded source row gives the same logits as the same row unpadded, alone."""
    model = make_model(**MODES["encoder-decoder"])
    src = _sequences(2, 7, seed=3)
    mask = torch.ones_like(src)
    mask[1, 4:] = 0
    padded = src.clone()
    padded[1, 4:] = 0
    tgt = _sequences(2, 5, seed=4)
    batched = _full_logits(model, padded, mask, tgt)
    alone = _full_logits(model, src[1:, :4], mask[1:, :4], tgt[1:])
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=PAD_ATOL)
    other = padded.clone()
    other[1, 4:] = 5  # what sits under the mask does not matter
    torch.testing.assert_close(_full_logits(model, other, mask, tgt)[1:], alone, rtol=0, atol=PAD_ATOL)


def test_decoder_only_right_padding_is_invisible_to_real_tokens(make_model):
    model = make_model(**MODES["decoder-only"])
    seq = _sequences(1, 6, seed=5)
    padded = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        a = model(padded, mask)[:, :6]
        b = model(seq)
    torch.testing.assert_close(a, b, rtol=0, atol=PAD_ATOL)


def test_forward_needs_decoder_ids_for_encoder_decoder(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(_sequences(1, 3))


def test_sinusoidal_positions_formula():
    pe = sinusoidal_positions(10, 8)
    pos, i = 7, 3  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
    assert pe.shape == (10, 8) and pe.dtype == torch.float32
    assert pe[pos, 2 * i].item() == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (6 / 8))).item())
    assert pe[pos, 2 * i + 1].item() == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (6 / 8))).item())


def test_config_round_trip_and_validation():
    cfg = TransformerConfig(vocab=["a", "b"], d_model=16, n_heads=2)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab=["a"], d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="bogus"):
        TransformerConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_linear_layers_are_named_for_lora(make_model):
    names = {n.rsplit(".", 1)[-1] for n, m in make_model().named_modules() if type(m) is torch.nn.Linear}
    assert names == {"q", "k", "v", "o", "fc1", "fc2", "lm_head"}
