"""A short run of every kernel and of training/decoding, for tools/leakcheck.sh (under valgrind).
Each call is repeated so that a per-call leak shows up as several lost blocks."""

import numpy as np

import pytransformer
from pytransformer import Transformer, TransformerConfig, ops
from pytransformer.train.data import make_batch, synthetic_pairs
from pytransformer.train.optim import Adam

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def kernels():
    a, b, bias = f32(5, 7), f32(7, 3), f32(3)
    ops.matmul(a, b, bias=bias, activation="gelu")
    out = np.zeros((5, 3), np.float32)
    ops.matmul(a, b, out=out, accumulate=True)
    ops.matmul(f32(2, 5, 7), b.T, trans_b=True)
    q, k, v = f32(2, 3, 2, 4), f32(2, 5, 2, 4), f32(2, 5, 2, 4)
    lengths = np.array([5, 2])
    o, lse = ops.attention(q, k, v, key_lengths=lengths, causal=True, return_lse=True)
    ops.attention_backward(f32(2, 3, 2, 4), q, k, v, o, lse, key_lengths=lengths, causal=True)
    ops.attention_decode(f32(2, 2, 4), k, v, key_lengths=lengths)
    x, g, be = f32(4, 6), f32(6), f32(6)
    y, m, r = ops.layer_norm(x, g, be, return_stats=True)
    ops.layer_norm_backward(f32(4, 6), x, g, m, r)
    ops.add_layer_norm(x, f32(4, 6), g, be, return_stats=True)
    ops.softmax_cross_entropy(f32(4, 9), np.array([1, -100, 3, 8]), label_smoothing=0.1)
    ops.log_softmax(f32(3, 5))
    ops.gelu(x)
    ops.gelu_backward(x, x)
    ops.relu_backward(x, np.maximum(x, 0))
    w = f32(9, 4)
    ids = np.array([[1, 2], [8, 1]])
    ops.embedding(w, ids, scale=2.0)
    ops.embedding_backward(f32(2, 2, 4), ids, np.zeros_like(w))
    ops.dropout(x, 0.3, seed=1)
    ops.dropout_backward(x, 0.3, seed=1)
    p, gr, mm, vv = f32(10), f32(10), np.zeros(10, np.float32), np.zeros(10, np.float32)
    ops.adam_step(p, gr, mm, vv, lr=1e-3, step=1)
    ops.global_norm([p, gr])
    ops.clip_grad_norm([gr], 0.1)
    # refused calls: the error paths must free what they allocated too
    for bad in (
        lambda: ops.matmul(a, a),
        lambda: ops.embedding(w, np.array([99])),
        lambda: ops.softmax_cross_entropy(f32(2, 3), np.array([0, 7])),
        lambda: ops.attention(q, k, v, key_lengths=np.array([9, 9])),
        lambda: ops.layer_norm(x, f32(5), be),
    ):
        try:
            bad()
        except (TypeError, ValueError, IndexError):
            pass


def model_run():
    cfg = TransformerConfig(
        src_vocab_size=20,
        tgt_vocab_size=20,
        d_model=8,
        num_heads=2,
        d_ff=16,
        num_encoder_layers=1,
        num_decoder_layers=1,
        max_len=12,
    )
    model = Transformer(cfg, seed=0)
    pairs = synthetic_pairs("reverse", 8, 20, 1, 5, seed=0)
    batch = make_batch(pairs, 0, 1, 2)
    opt = Adam(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    for step in range(3):
        model.zero_grad()
        model.loss_and_grad(batch, dropout_seed=step)
        opt.step(model.gradients())
    model.eval()
    model.translate([list(p[0]) for p in pairs[:3]], beam_size=2, max_decoding_length=5)


for threads in (1, 2):
    pytransformer.set_num_threads(threads)
    for _ in range(3):
        kernels()
    model_run()
print("leakcheck run: ok")
