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
