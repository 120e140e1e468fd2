"""The GPU's ways, run on the CPU: bf16 autocast under CUDA's policy, the fused AdamW and PAR's gathered form.

A GPU trains under `torch.autocast('cuda', dtype=torch.bfloat16)`; the CPU runs fp32. CPU autocast exists but follows
another policy (e.g. softmax, layer_norm, sum, exp stay bf16 on the CPU and run in fp32 on CUDA; CUDA refuses
`binary_cross_entropy`, the CPU computes it). `cuda_autocast_policy` re-registers, for the time of a test, every
`AutocastCPU` kernel with CUDA's rule for that operator (`torch.library`, a Python kernel that casts the inputs and
calls the operator again with autocast excluded, as torch's own autocast kernels do), so the bf16 training step a GPU
runs executes, with the GPU's dtypes, in the CPU suite. The same tests run on a GPU under real CUDA autocast
(`pytest -m gpu tests/test_autocast.py`; `.ci/gpu` does).
"""
import contextlib, copy
import pytest
import torch
from torch.library import Library

import weclip.rfm as rfm
from weclip.backbone import TINY_CLIP
from weclip.model import WeCLIP
from weclip.losses import weclip_loss

if not (hasattr(torch, 'get_autocast_dtype') and hasattr(torch.library, 'fallthrough_kernel')):
    pytest.skip('the CUDA-policy emulation and the CPU fused AdamW need torch >= 2.4', allow_module_level=True)

# CUDA's autocast policy (aten/src/ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE, AT_FORALL_PROMOTE, the banned BCE),
# by operator overload. `test_policy_covers_cuda_autocast` checks it against the installed torch's registrations.
LOWER = '''_convolution _convolution.deprecated conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d.input
conv_transpose3d.input convolution cudnn_convolution cudnn_convolution_transpose prelu addmm addmv addr matmul einsum mm
mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell
lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention
_cudnn_rnn'''.split()
FP32 = '''acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar
pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm rms_norm frobenius_norm.dim nuclear_norm
nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div
l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp
upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d
_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d
upsample_bicubic2d _upsample_bicubic2d_aa linalg_matrix_sqrth'''.split()   # the last: torch 2.14's, a linalg routine
FP32_SET_OPT_DTYPE = '''prod prod.dim_int prod.dim_Dimname softmax.int softmax.Dimname log_softmax.int
log_softmax.Dimname cumprod cumprod.dimname cumsum cumsum.dimname linalg_vector_norm linalg_matrix_norm
linalg_matrix_norm.str_ord sum sum.dim_IntList sum.dim_DimnameList'''.split()
FP32_APPEND_DTYPE = {'norm.Scalar': 'norm.ScalarOpt_dtype', 'norm.ScalarOpt_dim': 'norm.ScalarOpt_dim_dtype',
                     'norm.names_ScalarOpt_dim': 'norm.names_ScalarOpt_dim_dtype'}
PROMOTE = 'addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add'.split()
BANNED = ['binary_cross_entropy']
BCE_MESSAGE = ("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast (the emulated "
               "CUDA policy, as on a GPU): use binary_cross_entropy_with_logits, or compute it with autocast disabled.")
AUTOCAST_CPU = torch._C.DispatchKey.AutocastCPU


def _op(name: str):
    "The aten OpOverload of 'name' or 'name.overload'."
    base, _, overload = name.partition('.')
    return getattr(getattr(torch.ops.aten, base), overload or 'default')


def _registered(key: str) -> set:
    "Operator overloads with a kernel on dispatch key `key`, as 'name' or 'name.overload' (aten only)."
    return {n.removeprefix('aten::') for n in torch._C._dispatch_get_registrations_for_dispatch_key(key)
            if n.startswith('aten::')}


def _eligible(t) -> bool:
    "What CUDA's autocast casts: a floating tensor other than float64 (here: on the CPU)."
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == 'cpu'


def _map(x, f):
    "Apply `f` to every tensor in x (a tensor, list or tuple of them, or anything else, left as it is)."
    if isinstance(x, torch.Tensor): return f(x)
    if isinstance(x, (list, tuple)): return type(x)(_map(v, f) for v in x)
    return x


def _kernel(op, policy: str, target=None):
    "An AutocastCPU kernel applying CUDA's `policy` to `op`, then calling it (or `target`) below autocast."
    def call(fn, args, kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(AUTOCAST_CPU)): return fn(*args, **kwargs)
    def cast(args, kwargs, dtype):
        f = lambda t: t.to(dtype) if _eligible(t) else t
        return _map(args, f), {k: _map(v, f) for k, v in kwargs.items()}
    def kernel(*args, **kwargs):
        if policy == 'lower': return call(op, *cast(args, kwargs, torch.get_autocast_dtype('cpu')))
        if policy == 'fp32': return call(op, *cast(args, kwargs, torch.float32))
        if policy == 'fp32_set_opt_dtype':   # a given dtype wins; else an eligible first input asks for fp32
            i = [a.name for a in op._schema.arguments].index('dtype')
            given = args[i] if len(args) > i else kwargs.get('dtype')
            if given is None and _eligible(args[0]): args, kwargs = args[:i], {**kwargs, 'dtype': torch.float32}
            return call(op, args, kwargs)
        if policy == 'fp32_append_dtype':    # norm without dtype -> the overload with one
            return call(target, args, {**kwargs, 'dtype': torch.float32}) if _eligible(args[0]) else call(op, args, kwargs)
        if policy == 'promote':              # the widest floating dtype among the inputs
            ts = [t for t in _flat(args, kwargs) if _eligible(t)]
            wide = max((t.dtype for t in ts), key=lambda d: torch.finfo(d).bits, default=None)
            return call(op, *cast(args, kwargs, wide)) if wide is not None else call(op, args, kwargs)
        if policy == 'banned': raise RuntimeError(BCE_MESSAGE)
        raise AssertionError(policy)
    return kernel


def _flat(args, kwargs) -> list:
    "Every tensor among the arguments, also inside lists (index_put's indices)."
    out = []
    _map(list(args) + list(kwargs.values()), lambda t: out.append(t) or t)
    return out


def _exists(name: str) -> bool:
    "Whether this torch has the aten overload 'name' or 'name.overload'."
    base, _, overload = name.partition('.')
    return hasattr(torch.ops.aten, base) and overload in ('', *getattr(torch.ops.aten, base).overloads())


def policy_table() -> dict:
    "{overload name: CUDA policy} for every operator CUDA's autocast handles."
    table = dict.fromkeys(LOWER, 'lower') | dict.fromkeys(FP32, 'fp32')
    table |= dict.fromkeys(FP32_SET_OPT_DTYPE, 'fp32_set_opt_dtype') | dict.fromkeys(FP32_APPEND_DTYPE, 'fp32_append_dtype')
    return table | dict.fromkeys(PROMOTE, 'promote') | dict.fromkeys(BANNED, 'banned')


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU autocast with CUDA's policy while inside: each CUDA-handled operator gets CUDA's rule on AutocastCPU, each
    operator only the CPU's autocast handles falls through (as on CUDA). Every registration is removed on exit."""
    lib = Library('aten', 'IMPL')
    try:
        for name, policy in policy_table().items():
            if not _exists(name): continue                     # an operator this torch does not have
            target = _op(FP32_APPEND_DTYPE[name]) if policy == 'fp32_append_dtype' else None
            lib.impl(name, _kernel(_op(name), policy, target), 'AutocastCPU')
        for name in _registered('AutocastCPU') - _registered('AutocastCUDA'):
            lib.impl(name, torch.library.fallthrough_kernel, 'AutocastCPU')
        yield lib
    finally: lib._destroy()


def test_policy_covers_cuda_autocast():
    "Every operator the installed torch's CUDA autocast handles has its rule in the table, and every name is real."
    table, cuda = policy_table(), _registered('AutocastCUDA')
    assert not cuda - set(table), f'CUDA autocast handles operators the emulation does not know: {sorted(cuda - set(table))}'
    assert all(_exists(n) for n in cuda), [n for n in cuda if not _exists(n)]
    assert all(_exists(t) for n, t in FP32_APPEND_DTYPE.items() if _exists(n))   # norm's overloads with a dtype


def test_emulation_is_cuda_policy_and_scoped():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    w = torch.randn(3, 6)
    p, t = torch.rand(4, 6).clamp(0.1, 0.9), torch.rand(4, 6).round()
    before = _registered('AutocastCPU')
    with torch.autocast('cpu', dtype=torch.bfloat16):               # the CPU's own policy
        cpu_softmax = x.softmax(-1).dtype
    with cuda_autocast_policy():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert x.softmax(-1).dtype == torch.float32                        # fp32_set_opt_dtype, as on CUDA
            assert x.log_softmax(-1).dtype == x.sum().dtype == x.cumsum(0).dtype == torch.float32
            assert x.exp().dtype == x.log().dtype == x.pow(2).dtype == x.norm().dtype == torch.float32   # fp32
            assert torch.nn.functional.layer_norm(x, (6,)).dtype == torch.float32
            assert x.softmax(-1, dtype=torch.bfloat16).dtype == torch.bfloat16    # a dtype given explicitly wins
            assert torch.nn.functional.linear(x.float(), w).dtype == torch.bfloat16   # matmuls in bf16
            assert torch.einsum('ij,kj->ik', x.float(), w).dtype == torch.bfloat16
            assert torch.nn.functional.cross_entropy(x, torch.tensor([0, 1, 2, 3])).dtype == torch.float32
            assert torch.addcmul(x.float(), x, x).dtype == torch.float32          # promote: the widest input
            with pytest.raises(RuntimeError, match='unsafe to autocast'):
                torch.nn.functional.binary_cross_entropy(p, t)                 # refused, as CUDA refuses it
            with torch.autocast('cpu', enabled=False):                         # with autocast off: computed
                assert torch.isfinite(torch.nn.functional.binary_cross_entropy(p, t))
            y = x.float().requires_grad_()
            y.softmax(-1)[:, 0].sum().backward()                               # autograd sees the casts
            assert y.grad.dtype == torch.float32 and torch.isfinite(y.grad).all()
        assert x.softmax(-1).dtype == torch.bfloat16                           # outside autocast: untouched
    assert cpu_softmax == torch.bfloat16 and _registered('AutocastCPU') == before    # registrations gone
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert x.softmax(-1).dtype == torch.bfloat16
        assert torch.isfinite(torch.nn.functional.binary_cross_entropy(p, t))


# --- the training step under bf16 autocast -----------------------------------------------------------------------------

def _tiny_world(tmp_path_factory):
    from weclip.toy import write_toy_dataset
    return write_toy_dataset(tmp_path_factory.mktemp('toy') / 'toy', n_train=4, n_val=2, seed=0)


@pytest.fixture(scope='module')
def toy_batches(tmp_path_factory):
    "Three training batches of 2 toy images at crop 96, with the true masks (for supervision='full')."
    from weclip.data import VOC, TrainTransform, collate
    ds = VOC(_tiny_world(tmp_path_factory), 'train', transform=TrainTransform(crop_size=96), seed=0, with_masks=True)
    return ds.classes, [collate([ds[(2 * i) % 4], ds[(2 * i + 1) % 4]]) for i in range(3)]


@pytest.fixture(scope='module')
def backbone_text(toy_batches):
    "The shipped tiny CLIP (its toy weights) and the toy classes' text features, built once."
    from types import SimpleNamespace
    classes, _ = toy_batches
    cfg = SimpleNamespace(model=TINY_CLIP, weights='toy', device='cpu', dataset='toy', variant='official',
                          decoder_blocks=None, decoder_dim=32, rfm_start=1, rfm_layers=6, box_threshold=0.4,
                          aff_weight=0.1, aff_radius=8)
    torch.manual_seed(0)
    m = WeCLIP.from_config(cfg, classes=classes)
    return m.backbone, m.fg_text, m.bg_text


def _model(backbone_text, variant='official', numerics='clean', supervision='weak', device='cpu'):
    backbone, fg, bg = backbone_text
    torch.manual_seed(0)
    backbone = copy.deepcopy(backbone)
    return WeCLIP(backbone, fg, bg, variant=variant, numerics=numerics, supervision=supervision, decoder_dim=32,
                  rfm_start=1).to(device)


def _autocast(device: str):
    "bf16 autocast as the trainer enters it on a GPU; on the CPU under the emulated CUDA policy."
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)]
CASES = [('official', 'clean', 'weak'), ('paper', 'clean', 'weak'), ('official', 'official', 'weak'),
         ('paper', 'official', 'weak'), ('official', 'clean', 'full'), ('paper', 'clean', 'full')]


@pytest.fixture
def policy(request):
    "On the CPU the emulated CUDA policy for one test, then the CPU's own again (checked); a GPU needs none."
    if request.node.callspec.params.get('device', 'cpu') != 'cpu':
        yield; return
    before = _registered('AutocastCPU')
    with cuda_autocast_policy(): yield
    assert _registered('AutocastCPU') == before
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):           # the CPU's own policy is back: bf16 softmax, BCE allowed
        assert x.softmax(-1).dtype == torch.bfloat16
        torch.nn.functional.binary_cross_entropy(x.float().sigmoid(), torch.rand(3, 5))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('variant,numerics,supervision', CASES)
def test_bf16_training_steps(toy_batches, backbone_text, policy, device, variant, numerics, supervision):
    """Three steps of the trainer's loop (iterations 0-2: the static refinement, then RFM) under bf16 autocast: the
    networks in bf16, A_f, M_init, M_f and the losses in fp32 (README), the paper's BCE never reached under autocast,
    finite gradients on every decoder parameter, and the weights move."""
    model = _model(backbone_text, variant, numerics, supervision, device)
    opt = model.optimizer(2e-3)
    before = [p.detach().clone() for p in model.decoder.parameters()]
    for it, batch in enumerate(toy_batches[1]):
        model.train()
        with _autocast(device): r = model(batch, iteration=it)             # as weclip.train: `with amp: net(batch, ...)`
        assert r['P'].dtype == torch.bfloat16, 'the decoder did not run in bf16: autocast is not in effect'
        assert {k: r[k].dtype for k in ('A_f', 'M_init', 'M_f', 'total', 'seg', 'aff')} == \
            dict.fromkeys(('A_f', 'M_init', 'M_f', 'total', 'seg', 'aff'), torch.float32)
        assert all(torch.isfinite(r[k]).all() for k in ('total', 'seg', 'aff', 'A_f', 'M_init', 'M_f'))
        target = batch['mask'] if supervision == 'full' else r['M_p']      # full: the true masks are the target
        ref = weclip_loss(r['P'].float(), r['A_f'], target.to(device), lam=model.aff_weight, radius=model.aff_radius,
                          seg_variant=variant, aff_variant=variant)
        assert torch.allclose(ref['total'], r['total'], atol=1e-5)
        opt.zero_grad(set_to_none=True); r['total'].backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                   for p in model.decoder.parameters())
        opt.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    with _autocast(device), torch.no_grad(): out = model.backbone(toy_batches[1][0]['image'].to(device))
    assert out['attn'].dtype == torch.float32       # CUDA's policy: the attention's softmax in fp32 (the CPU's: bf16)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.decoder.parameters(), before))
    assert 0 < moved < 1, moved


@pytest.fixture(scope='module')
def toy_model():
    from weclip.pretrained import pretrained_toy, toy_batch
    model, cfg, names = pretrained_toy()
    return model, toy_batch(range(8), norm=cfg.norm)


@pytest.mark.parametrize('device', DEVICES)
def test_bf16_pseudo_labels_agree_with_fp32(toy_model, policy, device):
    "The shipped toy model's pseudo labels M_p (RFM + PAR) on 8 toy val scenes: bf16 autocast vs fp32, >= 99 % equal."
    model, batch = toy_model
    model = copy.deepcopy(model).to(device)
    b = {k: batch[k].to(device) for k in ('image', 'labels')}
    with torch.enable_grad():                                                  # Grad-CAM differentiates the class scores
        ref = model(b, iteration=None)['M_p']
        with _autocast(device): r = model(b, iteration=None)
    assert r['P'].dtype == torch.bfloat16
    agree = (r['M_p'] == ref).float().mean().item()
    print(f'bf16 vs fp32 pseudo labels on {device}: {agree:.2%} of pixels agree')
    assert agree >= 0.99, agree
    assert (ref != 0).any() and (ref == 0).any()                               # both classes and background present


# --- the fused AdamW and PAR's gathered form, forced on the CPU ---------------------------------------------------------

def _steps(model, opt, batches) -> list:
    "The trainer's step on each batch (the decoder's dropout drawn from seed 1); the pseudo labels of each step."
    out = []
    torch.manual_seed(1)
    for it, batch in enumerate(batches):
        model.train(); r = model(batch, iteration=it)
        opt.zero_grad(set_to_none=True); r['total'].backward(); opt.step(); out.append(r['M_p'])
    return out


def test_fused_adamw_trains_as_the_plain_loop(toy_batches, backbone_text):
    """Training steps with the fused AdamW (a GPU's) and with the plain loop (the CPU's): the same weights after the
    first step; after three the same losses and predictions. (Not all weights: the attention's key biases get a gradient
    that is rounding noise, since softmax ignores them, and AdamW turns noise into steps of ±lr under either kernel.)"""
    plain, fused = _model(backbone_text), _model(backbone_text)
    o_plain, o_fused = plain.optimizer(2e-3, fused=False), fused.optimizer(2e-3, fused=True)
    assert not o_plain.defaults['fused'] and o_fused.defaults['fused']
    before = [p.detach().clone() for p in plain.decoder.parameters()]
    pairs = lambda: zip(plain.decoder.parameters(), fused.decoder.parameters())
    losses = {}
    for m, o in ((plain, o_plain), (fused, o_fused)):
        torch.manual_seed(1); m.train(); r = m(toy_batches[1][0], iteration=0)
        o.zero_grad(set_to_none=True); r['total'].backward(); o.step(); losses[m] = [r['total'].item()]
    moved = max((a.detach() - b).abs().max().item() for a, b in zip(plain.decoder.parameters(), before))
    diff = max((a - b).abs().max().item() for a, b in pairs())
    assert moved > 1e-3 and diff < 1e-6, (moved, diff)                      # one step: the same update
    for m, o in ((plain, o_plain), (fused, o_fused)):
        torch.manual_seed(2)
        for it, batch in enumerate(toy_batches[1][1:], 1):
            m.train(); r = m(batch, iteration=it)
            o.zero_grad(set_to_none=True); r['total'].backward(); o.step(); losses[m].append(r['total'].item())
    assert torch.allclose(torch.tensor(losses[plain]), torch.tensor(losses[fused]), rtol=1e-5), losses
    plain.eval(); fused.eval()
    x = toy_batches[1][0]['image']
    pa, pb = plain.predict(x), fused.predict(x)
    assert (pa - pb).abs().max() < 1e-5 * pa.abs().max().clamp(min=1), (pa - pb).abs().max()


def test_gathered_par_trains_as_the_banded(toy_batches, backbone_text):
    "A whole training step with PAR the GPU's way (gathered) and the CPU's (banded): the same pseudo labels and weights."
    runs = {}
    for gathered in (True, False):
        rfm.PAR_GATHERED = gathered
        try:
            m = _model(backbone_text)
            runs[gathered] = m, _steps(m, m.optimizer(2e-3), toy_batches[1])
        finally: rfm.PAR_GATHERED = None
    (a, la), (b, lb) = runs[True], runs[False]
    assert all(torch.equal(x, y) for x, y in zip(la, lb)), [(x != y).sum().item() for x, y in zip(la, lb)]
    diff = max((p - q).abs().max().item() for p, q in zip(a.decoder.parameters(), b.decoder.parameters()))
    assert diff < 1e-5, diff


# --- a GPU's warm step waits for nothing ----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_warm_step_syncs_nothing_on_cuda(toy_batches, backbone_text, tmp_path):
    """A warm training step as the trainer runs it on a GPU (pinned batch, bf16 autocast, RFM on, fused AdamW, the
    schedule, the loss watch, the box masks copied up through pinned memory) under
    `torch.cuda.set_sync_debug_mode('error')`: no operation makes the host wait for the GPU. (The step's one designed wait, the event before the box masks are found from M_init on the host, is an
    `Event.synchronize`, which this mode does not see.)"""
    from weclip.train import LossWatch
    dev = torch.device('cuda', torch.cuda.current_device())
    model = _model(backbone_text, device=dev)
    opt = model.optimizer(2e-3)
    assert opt.defaults['fused']
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 10)
    watch = LossWatch(dev, tmp_path)
    batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in toy_batches[1]]
    def step(batch, it):
        model.train()
        with torch.autocast('cuda', dtype=torch.bfloat16): r = model(batch, iteration=it)
        watch.add(r, it, batch)
        opt.zero_grad(set_to_none=True); r['total'].backward(); opt.step(); sched.step()
    step(batches[0], 1); step(batches[1], 2); torch.cuda.synchronize()     # warm: RFM on, caches and allocator filled
    torch.cuda.set_sync_debug_mode('error')
    try: step(batches[2], 3)
    finally: torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(); watch.check(3)
    print("a warm step under torch.cuda.set_sync_debug_mode('error'): no synchronizing call")
