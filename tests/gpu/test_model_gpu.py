"""The model on CUDA computes the CPU function (fp32), and its bf16 forward stays close."""

import torch

from tests.parallel._ep_common import build_full_model, micro_batch, tiny_config


def test_cuda_fp32_matches_cpu_and_bf16_is_close():
    cfg = tiny_config()
    cpu = build_full_model(cfg)
    gpu = build_full_model(cfg).cuda()
    ids, labels = micro_batch(0, 0)
    ref = cpu(ids, labels)
    out = gpu(ids.cuda(), labels.cuda())
    torch.testing.assert_close(out.logits_BSV.cpu(), ref.logits_BSV, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), (_, q) in zip(gpu.named_parameters(), cpu.named_parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-4, msg=name)
    bf16 = build_full_model(cfg).cuda().to(torch.bfloat16)
    low = bf16(ids.cuda(), labels.cuda())
    assert abs(float(low.lm_loss) - float(ref.lm_loss)) < 0.05 * float(ref.lm_loss)


def test_bf16_grouped_mm_and_loop_kernel_agree_on_cuda():
    """The two experts paths in bf16 on this GPU: the same layer output and input gradient up to
    bf16 rounding (the grouped GEMM and cuBLAS may round differently), at widths of the presets."""
    from deepseek_moe.model.experts import RoutedExperts

    torch.manual_seed(0)
    L, D, H = 8, 256, 128
    counts = torch.tensor([40, 0, 17, 64, 1, 0, 33, 101], device="cuda")  # empty groups included
    x = torch.randn(int(counts.sum()), D, device="cuda", dtype=torch.bfloat16)
    outs = []
    for impl in ("grouped_mm", "loop"):
        torch.manual_seed(1)
        experts = RoutedExperts(L, D, H, impl=impl).cuda()
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.05)
        experts = experts.to(torch.bfloat16)
        xi = x.clone().requires_grad_(True)
        y = experts(xi, counts)
        y.float().square().sum().backward()
        outs.append((y.float(), xi.grad.float(), experts.down_proj.grad.float()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
