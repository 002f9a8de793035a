"""Row gradients: the gradient of a shard's rows only, equal to those rows of autograd's gradient."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.rowgrad import RowGradients, row_gradient_names, row_gradient_owners
from hiftune.engine.shards import RowShard
from tinymodels import TinyLM, lm_loss, snapshot, train_steps

SPANS = [(0, 3), (5, 9)]


def _shards(weight: nn.Parameter) -> list[RowShard]:
    shards = [RowShard(weight, a, b) for a, b in SPANS]
    for s in shards:
        s.attach()
    return shards


def _reference(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd's gradients, the weight's restricted to the spans."""
    module = copy.deepcopy(module)
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    out = module(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    grads = {f"rows{a}": module.weight.grad[a:b] for a, b in SPANS}
    if module.bias is not None if isinstance(module, nn.Linear) else False:
        grads["bias"] = module.bias.grad
    if x.is_floating_point():
        grads["input"] = x.grad
    return grads


def _row_gradients(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    module.weight.requires_grad_(True)
    shards = _shards(module.weight)
    owners = row_gradient_owners(module)
    row_gradients = RowGradients(owners, shards)
    row_gradients.install()
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    out = module(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    row_gradients.remove()
    assert "forward" not in vars(module)
    assert module.weight.grad is None  # no full-size gradient
    grads = {f"rows{s.start}": s.param.grad for s in shards}
    if isinstance(module, nn.Linear) and module.bias is not None:
        grads["bias"] = module.bias.grad
    if x.is_floating_point():
        grads["input"] = x.grad
    return grads


@pytest.mark.parametrize("bias", [False, True])
def test_linear_row_gradients_equal_autograd(bias):
    torch.manual_seed(0)
    module = nn.Linear(4, 12, bias=bias)
    x = torch.randn(2, 5, 4)
    want = _reference(module, x)
    got = _row_gradients(module, x)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


@pytest.mark.parametrize("padding_idx", [None, 6])
def test_embedding_row_gradients_equal_autograd(padding_idx):
    torch.manual_seed(0)
    module = nn.Embedding(12, 4, padding_idx=padding_idx)
    ids = torch.tensor([[0, 6, 6, 2, 8, 11], [5, 5, 1, 6, 9, 3]])  # repeats, padding, gaps
    want = _reference(module, ids)
    got = _row_gradients(module, ids)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


class ScaledEmbedding(nn.Embedding):
    """An embedding whose forward does more than look rows up (as Gemma's)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 3.0


def test_a_subclass_that_scales_the_lookup_gets_row_gradients_too():
    torch.manual_seed(0)
    module = ScaledEmbedding(12, 4)
    ids = torch.tensor([[0, 6, 6, 2, 8, 11], [5, 5, 1, 6, 9, 3]])
    want = _reference(module, ids)
    got = _row_gradients(module, ids)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_modules_whose_forward_cannot_be_wrapped_are_left_to_autograd():
    model = nn.ModuleDict(
        {
            "plain": nn.Embedding(8, 4),
            "scaled": ScaledEmbedding(8, 4),
            "renorm": nn.Embedding(8, 4, max_norm=1.0),
            "head": nn.Linear(4, 8),
            "tied_head": nn.Linear(4, 8, bias=False),
            "hooked": nn.Linear(4, 8),
            "shared": nn.Embedding(8, 4),
        }
    )
    model["tied_head"].weight = model["plain"].weight
    model["hooked"].forward = lambda x: x  # replaced on the instance, e.g. by accelerate
    model["shared"].weight = model["renorm"].weight  # also owned by a max_norm embedding
    names = {"plain.weight", "scaled.weight", "head.weight", "head.bias"}
    assert row_gradient_names(model) == names
    owners = row_gradient_owners(model)
    assert owners[id(model["plain"].weight)] == [model["plain"], model["tied_head"]]


class FunctionalHead(TinyLM):
    """A tied LM whose head uses the embedding matrix directly, not through a module."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)


@pytest.mark.parametrize("cls", [TinyLM, FunctionalHead])
def test_one_group_of_shards_equals_the_plain_optimizer(cls):
    # Every shard of the tied vocabulary in one group: the embedding's rows come from row
    # gradients, the functional head's (FunctionalHead) from the weight's full-size gradient; the
    # sum must be what a plain optimizer gets.
    torch.manual_seed(0)
    model = cls(vocab=200, tie=True)
    plain = copy.deepcopy(model)
    config = HiFTConfig(offload="none", max_unit_params=1000, units_per_group=15)
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-2)
    assert opt.num_groups == 1 and sum("[" in u.name for u in opt.units) > 1
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 200, (4, 12), generator=g) for _ in range(3)]
    torch.testing.assert_close(train_steps(model, opt, batches), train_steps(plain, ref, batches))
    want = snapshot(plain)
    for n, p in snapshot(model).items():
        torch.testing.assert_close(p, want[n], msg=n)


def test_no_full_size_gradient_while_a_shard_trains_and_close_restores_the_forwards():
    torch.manual_seed(0)
    model = TinyLM(vocab=200, tie=True)
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(offload="none"), lr=1e-2)
    assert opt.group_names[0].startswith("embed.embed.weight[")
    ids = torch.randint(0, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    lm_loss(model, ids).backward()
    # Tied: both the embedding and the LM head are taken over, and the weight gets no gradient.
    assert "forward" in vars(model.embed) and "forward" in vars(model.lm_head)
    assert model.embed.weight.requires_grad and model.embed.weight.grad is None
    (shard,) = opt.master_parameters()
    assert shard.grad is not None and shard.grad.shape == (66, 16)
    opt.step()
    opt.zero_grad()
    opt.close()
    assert all("forward" not in vars(m) for m in model.modules())


def test_a_copy_of_the_model_taken_mid_step_trains_its_own_weights():
    # deepcopy (and pickle) of a model whose shard group is active: the copy must not send its
    # embedding's gradient to the optimizer's shards, or it would never be trained.
    torch.manual_seed(0)
    model = TinyLM(vocab=200, tie=True)
    HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(offload="none"), lr=1e-2)
    ids = torch.randint(0, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    for copied in (copy.deepcopy(model), _pickled(model)):
        copied.requires_grad_(True)
        lm_loss(copied, ids).backward()
        assert all(p.grad is not None for p in copied.parameters())
        reference = copy.deepcopy(copied)
        for m in reference.modules():
            vars(m).pop("forward", None)
        reference.zero_grad()
        lm_loss(reference, ids).backward()
        for (n, p), q in zip(copied.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def _pickled(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_linear_row_gradients_under_autocast_equal_nn_linear(device):
    # Under autocast nn.Linear's backward multiplies in bf16; the row-gradient backward used to
    # run outside autocast and computed the input's gradient in fp32 (not what autocast trains).
    torch.manual_seed(0)
    module = nn.Linear(64, 48).to(device)
    x = torch.randn(4, 16, 64, device=device)
    grad = torch.randn(4, 16, 48, device=device).bfloat16()
    got, want = {}, {}
    for grads, rows in ((want, False), (got, True)):
        m = copy.deepcopy(module)
        shards = _shards(m.weight) if rows else []
        row_gradients = RowGradients(row_gradient_owners(m), shards)
        row_gradients.install()
        xx = x.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = m(xx)
        assert out.dtype == torch.bfloat16
        out.backward(grad)
        row_gradients.remove()
        grads["input"], grads["bias"] = xx.grad, m.bias.grad
        for a, b in SPANS:
            shard = next((s for s in shards if s.start == a), None)
            grads[f"rows{a}"] = m.weight.grad[a:b] if shard is None else shard.param.grad
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_row_gradients_sum_half_precision_rows_in_fp32(device):
    # A token seen 4096 times: summed in bf16 its gradient would stop growing at 256 (index_add_ on
    # CUDA adds in the tensor's dtype). PyTorch's embedding backward sums in fp32 and rounds once.
    torch.manual_seed(0)
    module = nn.Embedding(12, 8, padding_idx=6).to(device, torch.bfloat16)
    ids = torch.cat([torch.full((4096,), 2), torch.randint(0, 12, (512,))]).to(device)
    grad = torch.rand(ids.shape[0], 8, device=device).bfloat16()
    weight = module.weight.detach().float().requires_grad_(True)
    F.embedding(ids, weight, padding_idx=6).backward(grad.float())
    want = weight.grad.bfloat16()
    module.weight.requires_grad_(True)
    shards = _shards(module.weight)
    row_gradients = RowGradients(row_gradient_owners(module), shards)
    row_gradients.install()
    module(ids).backward(grad)
    row_gradients.remove()
    assert want[2, 0] > 1000
    for s in shards:
        assert s.param.grad.dtype == torch.bfloat16
        # fp32 sums in another order round to the same bf16 value, or one unit apart
        torch.testing.assert_close(s.param.grad, want[s.start : s.stop], rtol=2**-7, atol=0)


def test_embedding_row_gradients_never_read_the_device():
    # Boolean indexing sizes its result by the data: on CUDA a host sync inside backward. On the
    # meta device, which holds no data, any such read fails: the backward must still run.
    module = nn.Embedding(12, 4, padding_idx=6, device="meta")
    ids = torch.empty(2, 6, dtype=torch.long, device="meta")
    shards = _shards(module.weight)
    row_gradients = RowGradients(row_gradient_owners(module), shards)
    row_gradients.install()
    module(ids).sum().backward()
    row_gradients.remove()
    assert [s.param.grad.shape for s in shards] == [(b - a, 4) for a, b in SPANS]
