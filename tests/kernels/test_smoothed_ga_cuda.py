"""The Triton kernel at real sizes on a GPU (skipped without CUDA): Llama-3 and Gemma vocabularies, and
N * V > 2**31 elements, where 32-bit row offsets would overflow."""
import pytest
import torch

from sga.kernels import smoothed_ga_loss, smoothed_ga_loss_reference

pytestmark = pytest.mark.cuda


def check_rows(logits, labels, weights, loss_per_token, grad, rows, **options):
    """Compare chosen rows with the float64 oracle (the full float64 problem would not fit)."""
    for row in rows:
        z = logits[row : row + 1].double().requires_grad_(True)
        exact = smoothed_ga_loss_reference(z, labels[row : row + 1], token_weights=weights[row : row + 1],
                                           reduction="none", **options)
        exact.backward()
        torch.testing.assert_close(loss_per_token[row : row + 1].double(), exact.detach(), atol=2e-4, rtol=1e-5)
        bf16_half_ulp = 2.0**-8 * z.grad.abs() + 1e-9
        assert torch.all((grad[row].double() - z.grad[0]).abs() <= bf16_half_ulp * 1.01)


@pytest.mark.parametrize("vocab_size", [128256, 262144])
def test_real_vocabularies_bf16(vocab_size):
    torch.manual_seed(0)
    num_tokens = 4096
    logits = (3 * torch.randn(num_tokens, vocab_size, device="cuda")).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab_size, (num_tokens,), device="cuda")
    labels[::7] = -100
    weights = torch.randn(num_tokens, device="cuda")
    loss = smoothed_ga_loss(logits, labels, smoothing=0.1, token_weights=weights, reduction="none")
    loss.sum().backward()
    check_rows(logits.detach(), labels, weights, loss.detach(), logits.grad, [0, 1, num_tokens // 2, num_tokens - 1],
               smoothing=0.1)


def test_more_than_2_pow_31_elements():
    vocab_size = 262144
    num_tokens = (2**31) // vocab_size + 3  # N * V > 2**31
    torch.manual_seed(1)
    logits = torch.randn(num_tokens, vocab_size, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (num_tokens,), device="cuda")
    weights = torch.ones(num_tokens, device="cuda")
    loss = smoothed_ga_loss(logits, labels, smoothing=-0.4, reduction="none")
    loss.sum().backward()
    check_rows(logits.detach(), labels, weights, loss.detach(), logits.grad, [0, num_tokens - 2, num_tokens - 1],
               smoothing=-0.4)


def test_triton_matches_torch_backend_on_gpu():
    torch.manual_seed(2)
    logits = torch.randn(257, 32000, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 32000, (257,), device="cuda")
    results = {}
    for backend in ("triton", "torch"):
        leaf = logits.clone().requires_grad_(True)
        loss = smoothed_ga_loss(leaf, labels, smoothing=0.1, backend=backend)
        (loss * 0.5).backward()
        results[backend] = (loss, leaf.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-5)
    # gradients here are ~1e-7 (a mean over 257 tokens): the absolute slack is relative to their size, so an
    # all-zero or halved gradient fails; 2e-2 covers the two backends' bf16 roundings of c (p - eps / V)
    expected_grad = results["torch"][1].float()
    torch.testing.assert_close(results["triton"][1].float(), expected_grad, atol=1e-3 * expected_grad.abs().max().item(),
                               rtol=2e-2)


def test_cuda_graph_capture_has_no_host_sync():
    """No .item() in forward/backward: the call (validate=False) can be captured in a CUDA graph."""
    logits = torch.randn(64, 1000, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compiles the kernels) outside the capture
            smoothed_ga_loss(logits, labels, smoothing=0.1, validate=False).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    with torch.cuda.graph(graph):
        loss = smoothed_ga_loss(logits, labels, smoothing=0.1, validate=False)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    expected = smoothed_ga_loss(logits.detach(), labels, smoothing=0.1)
    torch.testing.assert_close(loss, expected)
