"""bench/train_roofline.py's FLOP count equals what PyTorch's own FLOP counter measures for a
forward and backward pass of the reference model on the same padded batch."""

import pathlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torch_reference import TorchTransformer  # noqa: E402

from pytransformer import TransformerConfig  # noqa: E402

# The bench scripts put the checkout first on sys.path when imported; other tests hand sys.path
# to child processes, which must import the installed package, not the unbuilt sources.
_saved_path = list(sys.path)
sys.path.insert(0, str(ROOT / "bench"))
try:
    from train_roofline import step_flops
finally:
    sys.path[:] = _saved_path


def counted_flops(fields: dict, B: int, S: int, T: int, seed: int) -> int:
    model = TorchTransformer(TransformerConfig(**fields, dropout=0.0))
    rng = np.random.default_rng(seed)
    src = rng.integers(3, fields["src_vocab_size"], (B, S))
    tgt_in, tgt_out = rng.integers(3, fields["tgt_vocab_size"], (2, B, T))
    lengths = rng.integers(1, S + 1, B)
    # the math backend runs attention as batched products, which the counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(src, lengths, tgt_in, tgt_out).backward()
    return counter.get_total_flops()


@settings(max_examples=8, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(1, 9), d_ff=st.integers(1, 40),
       enc=st.integers(1, 3), dec=st.integers(1, 3), src_vocab=st.integers(4, 41),
       tgt_vocab=st.integers(4, 41), B=st.integers(1, 5), S=st.integers(1, 11),
       T=st.integers(1, 11))  # fmt: skip
def test_padded_count_equals_torch_flop_counter(heads, head_dim, d_ff, enc, dec, src_vocab,
                                                tgt_vocab, B, S, T):  # fmt: skip
    fields = dict(d_model=heads * head_dim, num_heads=heads, d_ff=d_ff, num_encoder_layers=enc,
                  num_decoder_layers=dec, src_vocab_size=src_vocab,
                  tgt_vocab_size=tgt_vocab)  # fmt: skip
    assert step_flops(fields, B * S, B * T, S, T) == counted_flops(fields, B, S, T, seed=B * S)
