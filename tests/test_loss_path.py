"""The LM loss paths (megatron_l2e/loss.py): chunked = reference, on functions, a whole model, and DeepSpeed.

* ``ChunkedLinearCrossEntropy`` against ``F.cross_entropy`` of full logits: loss and both gradients, with a
  padded vocabulary (96 ids, labels < 80), chunk sizes that do and do not divide the token count, fp32
  and bf16 inputs (fp32 accumulation: no worse than the reference's own bf16 error);
* a tiny GPT-NeoX: loss and *every* parameter gradient of ``lm_loss_of`` equal between ``chunked`` and
  ``reference``, with non-reentrant activation checkpointing, the blocks' forward hooks firing;
* DeepSpeed, one rank, ZeRO-1 and ZeRO-3 (where ``lm_head.weight`` is an empty tensor outside its own
  forward): the same losses and weights as ``reference`` over a few steps.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_l2e.config import ConfigError, ModelConfig, load_config
from megatron_l2e.loss import (LossHead, LossImplError, chunked_linear_cross_entropy, loss_head_of,
                               reference_linear_cross_entropy, resolve_loss_impl)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V_MODEL, V_TOK = 96, 80           # padded model vocabulary; the "tokenizer" uses ids < 80


def _inputs(n, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V_MODEL, h, generator=g) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V_TOK, (n,), generator=g)
    return hid, w, t


def _loss_and_grads(fn, hid, w, t, upstream=1.0):
    hid.grad = w.grad = None
    loss = fn(hid, w, t)
    (loss * upstream).backward()
    return loss.detach(), hid.grad.clone(), w.grad.clone()


def test_reference_is_f_cross_entropy():
    hid, w, t = _inputs(23, 8, torch.float32)
    loss = reference_linear_cross_entropy(hid, w, t)
    assert torch.equal(loss, F.cross_entropy((hid @ w.t()).float(), t))


@pytest.mark.parametrize("chunk", [1, 7, 16, 53, 4096])   # 53 tokens: 7 and 16 leave a short last chunk
def test_chunked_equals_reference_fp32(chunk):
    hid, w, t = _inputs(53, 24, torch.float32)
    ref = _loss_and_grads(reference_linear_cross_entropy, hid, w, t, upstream=0.37)
    got = _loss_and_grads(lambda a, b, c: chunked_linear_cross_entropy(a, b, c, chunk), hid, w, t, upstream=0.37)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert got[2][V_TOK:].abs().amin(1).gt(0).all()   # padded ids get softmax mass: logits span the padded vocab


def test_chunked_bf16_accumulates_in_fp32():
    """bf16 inputs: the chunked loss and gradients are no further from the exact (fp64) values than
    the bf16 reference path is — the per-chunk fp32 upcast and fp32 dW accumulation lose nothing."""
    hid, w, t = _inputs(64, 32, torch.bfloat16, seed=1)
    exact = [x.float() for x in _loss_and_grads(
        reference_linear_cross_entropy, hid.detach().double().requires_grad_(), w.detach().double().requires_grad_(), t)]
    ref = _loss_and_grads(reference_linear_cross_entropy, hid, w, t)
    got = _loss_and_grads(lambda a, b, c: chunked_linear_cross_entropy(a, b, c, 10), hid, w, t)
    assert got[1].dtype == got[2].dtype == torch.bfloat16 and got[0].dtype == torch.float32
    for name, g, r, e in zip(("loss", "d hidden", "d weight"), got, ref, exact):
        err_g = (g.float() - e).abs().max().item()
        err_r = (r.float() - e).abs().max().item()
        assert err_g <= 1.5 * err_r + 1e-3 * e.abs().max().item(), (name, err_g, err_r)


def test_chunked_no_grad_and_double_backward():
    hid, w, t = _inputs(20, 8, torch.float32)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hid, w, t, 6)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference_linear_cross_entropy(hid, w, t).detach())
    loss = chunked_linear_cross_entropy(hid, w, t, 6)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed by the first backward"):
        loss.backward()


def _fused_against_reference(device, dtype, n=53):
    from megatron_l2e.loss import fused_linear_cross_entropy

    hid, w, t = _inputs(n, 24, dtype)
    hid, w, t = (hid.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_(), t.to(device))
    ref = _loss_and_grads(reference_linear_cross_entropy, hid, w, t, upstream=0.37)
    got = _loss_and_grads(fused_linear_cross_entropy, hid, w, t, upstream=0.37)
    assert got[1].dtype == got[2].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_reference_on_cuda(dtype):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install '.[gpu]')")
    assert resolve_loss_impl("auto", "cuda") == "fused"
    _fused_against_reference("cuda", dtype, n=4096)


def test_fused_under_triton_interpreter():
    """liger-kernel's kernels on CPU tensors (Triton's interpreter), where liger is installed."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (the CPU venv does not need it)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not set (conftest sets it on machines without CUDA)")
    _fused_against_reference("cpu", torch.float32)


def test_resolve_and_config():
    assert resolve_loss_impl("auto", "cpu") == "chunked"
    assert resolve_loss_impl("reference", "cpu") == "reference"
    with pytest.raises(LossImplError, match="needs CUDA"):
        resolve_loss_impl("fused", "cpu")
    assert ModelConfig().loss_impl == "auto"
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match="loss_impl"):
        load_config(root / "configs/smoke/cpu.yml", ["model.loss_impl=fast"])
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        load_config(root / "configs/smoke/cpu.yml", ["model.loss_chunk_size=0"])


# ----------------------------------------------------------------------------------------------
# A whole (tiny) GPT-NeoX
# ----------------------------------------------------------------------------------------------

def _tiny(impl, chunk=16, checkpointing=True):
    from megatron_l2e.model import build_model, enable_activation_checkpointing

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=V_MODEL, seq_length=24,
                      loss_impl=impl, loss_chunk_size=chunk, attn_implementation="sdpa")
    model = build_model(cfg)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


@pytest.mark.parametrize("chunk", [5, 48, 1024])       # batch [2, 24] = 48 tokens
def test_model_loss_and_every_gradient_match_reference(chunk):
    from megatron_l2e.train import lm_loss_of

    batch = torch.randint(0, V_TOK, (2, 25), generator=torch.Generator().manual_seed(3))
    grads, losses = {}, {}
    for impl in ("reference", "chunked"):
        model = _tiny(impl, chunk)
        fired = []
        for layer in model.gpt_neox.layers:              # where L2E hooks its sites
            layer.register_forward_hook(lambda m, i, o: fired.append(o.shape))
        loss = lm_loss_of(model, batch)
        assert len(fired) == 2                          # both blocks' hooks fired in the forward
        loss.backward()
        losses[impl] = loss.detach()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(losses["chunked"], losses["reference"], rtol=1e-6, atol=0)
    assert grads["chunked"].keys() == grads["reference"].keys()
    for n, g in grads["reference"].items():
        torch.testing.assert_close(grads["chunked"][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_head_is_a_plain_linear_without_targets(tmp_path):
    model = _tiny("chunked", checkpointing=False).eval()
    ref = _tiny("reference", checkpointing=False).eval()
    assert isinstance(model.lm_head, LossHead) and loss_head_of(model) is model.lm_head
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ids = torch.randint(0, V_TOK, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in f.keys()           # exported under GPT-NeoX's name, as before


# ----------------------------------------------------------------------------------------------
# DeepSpeed, one rank: ZeRO-1 and ZeRO-3
# ----------------------------------------------------------------------------------------------

class _Tokens:
    def micro_batch(self, step, j, mb, rank, world):
        g = torch.Generator().manual_seed(1000 * step + 10 * j + rank)
        return torch.randint(0, V_TOK, (mb, 25), generator=g)


def _deepspeed_run(dist, impl, zero, steps=3):
    from megatron_l2e import engine as eng
    from megatron_l2e.train import seed_everything, train_step

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/smoke/cpu.yml", [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", f"model.vocab_size={V_MODEL}",
        "model.seq_length=24", f"model.loss_impl={impl}", "model.loss_chunk_size=20", "model.attn_implementation=sdpa",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=fp32", "l2e.enabled=false",
        f"distributed.zero_stage={zero}", "optimizer.lr=0.01"])
    layout = eng.BatchLayout(4, 2, 1)
    seed_everything(0)
    from megatron_l2e.model import build_model, enable_activation_checkpointing
    model = build_model(cfg.model)
    enable_activation_checkpointing(model)
    engine, _, _ = eng.build_engine(model, cfg, dist, layout)
    if zero == 3:   # partitioned: outside lm_head's forward its weight is an empty tensor
        assert engine.module.lm_head.weight.numel() == 0
    losses = [train_step(engine, _Tokens(), None, s, layout, dist).lm_loss for s in range(steps)]
    if zero == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return losses, params


@pytest.mark.parametrize("zero", [1, 3])
def test_deepspeed_chunked_trains_as_reference(ds_world, zero):
    ref_losses, ref_params = _deepspeed_run(ds_world, "reference", zero)
    got_losses, got_params = _deepspeed_run(ds_world, "chunked", zero)
    assert got_losses == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    for n, p in ref_params.items():
        # Adam divides by sqrt(v): zero-gradient entries (the key part of the qkv bias) amplify rounding.
        tol = dict(rtol=0, atol=2e-3) if n.endswith("query_key_value.bias") else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_params[n], p, **tol, msg=lambda m: f"{n}: {m}")


def test_bench_loss_cli_writes_ratios(tmp_path):
    """tools/bench_loss.py end to end on a small shape (the default shape is the benchmark's job)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(root / "tools/bench_loss.py"), "--batch", "2", "--seq", "64",
                        "--hidden", "16", "--vocab", "600", "--chunk", "50", "--repeats", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["peak_ratio"] > 0 and res["time_ratio"] > 0 and res["loss_diff"] < 1e-5
    assert res["shape"]["tokens"] == 128 and res["chunk_tokens"] == 50
    assert set(res["paths"]) == {"reference", "chunked"} and "peak_ratio" in p.stdout
