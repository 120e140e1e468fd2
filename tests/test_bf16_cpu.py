"""The bf16 path a GPU trains with, run on the CPU. CPU autocast already runs the matrix products (linear, matmul, conv)
in bf16 as CUDA's does; CUDA's policy also runs normalisations, softmaxes, reductions, exp/log/pow and the losses in
float32 and refuses binary_cross_entropy. `cuda_policy` registers those rules on the AutocastCPU key with torch.library,
so the training step meets on the CPU the dtypes it meets on a GPU."""
import contextlib, warnings
import pytest
import torch, torch.nn.functional as F

FP32 = ('layer_norm', 'native_layer_norm', 'group_norm', 'softmax.int', 'log_softmax.int', 'sum', 'sum.dim_IntList',
        'exp', 'log', 'pow.Tensor_Scalar', 'pow.Tensor_Tensor', 'pow.Scalar', 'norm.Scalar', 'norm.ScalarOpt_dim',
        'linalg_vector_norm', 'cumsum', 'prod', 'logsumexp', 'nll_loss', 'nll_loss2d', 'mse_loss', 'l1_loss',
        'smooth_l1_loss', 'binary_cross_entropy_with_logits', 'kl_div', 'cosine_similarity')   # CUDA's fp32 list (part)
LOW = (torch.bfloat16, torch.float16)


def _in_fp32(op):
    "A kernel that runs `op` with its reduced-precision tensor arguments cast to float32, autocast off (CUDA's way)."
    cast = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype in LOW else a
    def kernel(*args, **kwargs):
        with torch.autocast('cpu', enabled=False):
            return op(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
    return kernel


def _refuse(*args, **kwargs):
    raise RuntimeError('torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast '
                       '(as CUDA says): compute it in float32 with autocast disabled.')


@contextlib.contextmanager
def cuda_policy():
    "bf16 autocast on the CPU with CUDA's float32 list and its refusal of binary_cross_entropy."
    lib = torch.library.Library('aten', 'IMPL')
    try:
        with warnings.catch_warnings():              # CPU autocast has kernels of its own for a few: overridden
            warnings.simplefilter('ignore')
            for name in FP32:
                base, _, overload = name.partition('.')
                lib.impl(name, _in_fp32(getattr(getattr(torch.ops.aten, base), overload or 'default')), 'AutocastCPU')
            lib.impl('binary_cross_entropy', _refuse, 'AutocastCPU')
        with torch.autocast('cpu', dtype=torch.bfloat16): yield
    finally: lib._destroy()


def test_the_emulated_policy():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with cuda_policy():
        h = x @ w
        assert h.dtype == torch.bfloat16                                  # a matrix product: bf16, as on a GPU
        assert h.softmax(-1).dtype == F.layer_norm(h, (8,)).dtype == h.sum().dtype == h.exp().dtype == torch.float32
        with pytest.raises(RuntimeError, match='unsafe to autocast'):
            F.binary_cross_entropy(torch.rand(4), torch.rand(4))
        with torch.autocast('cpu', enabled=False):                       # an fp32 island works
            F.binary_cross_entropy(torch.rand(4), torch.rand(4))
    assert h.softmax(-1).dtype == torch.bfloat16                          # the rules are gone afterwards


def toy_model(**kw):
    from weclip.config import make_config
    from weclip.model import WeCLIP
    from weclip.toy import SHAPES
    cfg = make_config('toy', model='weclip-tiny', weights='none', decoder_dim=32, device='cpu', rfm_start=0, **kw)
    torch.manual_seed(0)
    return WeCLIP.from_config(cfg, classes=list(SHAPES)), cfg


@pytest.mark.parametrize('kw', [dict(), dict(variant='paper'), dict(numerics='official'), dict(supervision='full')],
                         ids=['official', 'paper', 'official-numerics', 'full-supervision'])
def test_training_steps_under_bf16(kw, monkeypatch):
    """Two training steps as a GPU runs them (bf16 networks, float32 islands, PAR gathered, AdamW fused) on each variant:
    finite losses in float32, the decoder's prediction in bf16, the weights moved, the first loss close to float32's."""
    import weclip.rfm
    monkeypatch.setattr(weclip.rfm, 'PAR_GATHERED', True)
    from weclip.pretrained import toy_batch
    batch = {k: v for k, v in toy_batch((1, 5)).items() if k in ('image', 'labels', 'mask')}
    model, cfg = toy_model(**kw)
    model.train()
    with torch.random.fork_rng(): ref = float(model(batch, iteration=1)['total'].detach())   # float32, same dropout
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    opt = model.optimizer(1e-3, fused=True)
    for it in range(2):
        with cuda_policy(): r = model(batch, iteration=it + 1)
        assert r['P'].dtype == torch.bfloat16 and r['total'].dtype == torch.float32 and torch.isfinite(r['total'])
        loss = float(r['total'].detach())
        if it == 0: assert abs(loss - ref) <= 0.05 * abs(ref) + 1e-3, (loss, ref)
        opt.zero_grad(set_to_none=True); r['total'].backward(); opt.step()
    after = model.trainable_state_dict()
    assert all(torch.isfinite(v).all() for v in after.values()) and any(not torch.equal(before[k], after[k]) for k in after)


def test_bf16_pseudo_labels_agree_with_float32():
    "The shipped toy model's pseudo labels M_p under the GPU's bf16 policy and in float32: the same on >= 99 % of pixels."
    from weclip.pretrained import pretrained_toy, toy_batch
    from weclip.evaluate import pseudo_labels_of
    model, cfg, _ = pretrained_toy()
    b = toy_batch(norm=cfg.norm)
    fp32 = pseudo_labels_of(model, b['image'], b['labels'])
    with cuda_policy():
        bf16 = pseudo_labels_of(model, b['image'], b['labels'])
        assert model.backbone(b['image'])['tokens'][-1].dtype == torch.bfloat16   # the backbone did run in bf16
    agree = (fp32 == bf16).float().mean().item()
    print(f'bf16 vs float32 pseudo labels: {agree:.2%} of pixels agree')
    assert agree >= 0.99, agree
