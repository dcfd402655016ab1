"""HeadProbe: both gradient paths against a per-sample loop; the model left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_batch import AdaptiveBatchError, HeadProbe, find_head
from adaptive_batch.probe import functorch_gram, linear_head_gram

from .reference import per_sample_head_grads

ATOL = 1e-5


def mlp_bn_dropout() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5)
    )


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.dropout(self.features(x).flatten(1)))


def _warm_up_batchnorm(model: nn.Module, inputs: torch.Tensor) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(inputs)


CASES = {
    "mlp": (mlp_bn_dropout, (12, 6), 5),
    "cnn": (SmallCNN, (10, 3, 6, 6), 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["gram", "func"])
def test_gram_and_losses_match_per_sample_loop(case, method):
    build, shape, classes = CASES[case]
    model = build()
    inputs, targets = torch.randn(*shape), torch.randint(0, classes, shape[:1])
    _warm_up_batchnorm(model, inputs)
    result = HeadProbe(model, method=method)(inputs, targets)
    grads, losses = per_sample_head_grads(model, find_head(model), inputs, targets)
    torch.testing.assert_close(result.gram, grads @ grads.T, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(result.losses, losses, atol=ATOL, rtol=1e-5)


def test_chunked_func_path_equals_one_chunk():
    model = mlp_bn_dropout().eval()
    inputs, targets = torch.randn(23, 6), torch.randint(0, 5, (23,))
    whole = HeadProbe(model, method="func")(inputs, targets).gram
    # 85 parameters in the head: a budget of 400 numbers forces chunks of 2 samples.
    chunked = HeadProbe(model, method="func", max_grad_numel=400)(inputs, targets).gram
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=1e-5)


def test_soft_targets_closed_form_matches_func():
    model = mlp_bn_dropout().eval()
    inputs = torch.randn(9, 6)
    targets = torch.softmax(torch.randn(9, 5), dim=1)
    closed = HeadProbe(model, method="gram")(inputs, targets)
    func = HeadProbe(model, method="func")(inputs, targets)
    torch.testing.assert_close(closed.gram, func.gram, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(closed.losses, func.losses)


def label_smoothed(out, y):
    return F.cross_entropy(out, y, reduction="none", label_smoothing=0.2)


@pytest.mark.parametrize("method", ["gram", "func"])
def test_any_loss(method):
    model = mlp_bn_dropout().eval()
    inputs, targets = torch.randn(11, 6), torch.randint(0, 5, (11,))
    result = HeadProbe(model, loss=label_smoothed, method=method)(inputs, targets)
    grads, losses = per_sample_head_grads(model, model[-1], inputs, targets, label_smoothed)
    torch.testing.assert_close(result.gram, grads @ grads.T, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(result.losses, losses)


class TanhHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def test_non_linear_head_uses_func_path():
    head = TanhHead()
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), head)
    inputs, targets = torch.randn(7, 5), torch.randint(0, 3, (7,))
    result = HeadProbe(model, head=head)(inputs, targets)  # auto -> func
    grads, _ = per_sample_head_grads(model, head, inputs, targets)
    torch.testing.assert_close(result.gram, grads @ grads.T, atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="method='func'"):
        HeadProbe(model, head=head, method="gram")


def test_sequence_features_with_a_custom_loss_match_on_both_paths():
    # A linear head over [B, T, D] features: per-sample gradients sum over T. The closed form
    # takes it (deltas of a custom loss from torch.func), and so does the func path.
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    inputs, targets = torch.randn(5, 7, 4), torch.randint(0, 3, (5, 7))

    def seq_loss(out, y):
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)

    grads, _ = per_sample_head_grads(model, model[-1], inputs, targets, seq_loss)
    for method in ("gram", "func"):
        result = HeadProbe(model, loss=seq_loss, method=method)(inputs, targets)
        torch.testing.assert_close(result.gram, grads @ grads.T, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("frozen", ["weight", "bias", "no_bias"])
def test_frozen_or_missing_head_parameters(frozen):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=frozen != "no_bias"))
    if frozen != "no_bias":
        getattr(model[-1], frozen).requires_grad_(False)
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    grads, _ = per_sample_head_grads(model, model[-1], inputs, targets)
    for method in ("gram", "func"):
        gram = HeadProbe(model, method=method)(inputs, targets).gram
        torch.testing.assert_close(gram, grads @ grads.T, atol=ATOL, rtol=1e-4)


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        torch.get_rng_state(),
    )


@pytest.mark.parametrize("method", ["gram", "func"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_left_exactly_as_it_was(mode, method):
    model = SmallCNN()
    inputs, targets = torch.randn(10, 3, 6, 6), torch.randint(0, 4, (10,))
    _warm_up_batchnorm(model, inputs)
    model.features[1].eval()  # mixed flags: one BatchNorm in eval, the rest in train
    state, flags, rng = _snapshot(model)
    HeadProbe(model, mode=mode, method=method, max_grad_numel=300)(inputs, targets)
    new_state, new_flags, new_rng = _snapshot(model)
    assert new_flags == flags
    assert torch.equal(new_rng, rng)
    for key, value in state.items():
        assert torch.equal(new_state[key], value), key


def test_modes_mean_what_they_say():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    inputs, targets = torch.randn(16, 4), torch.randint(0, 3, (16,))
    _warm_up_batchnorm(model, inputs * 3 + 1)  # running statistics differ from the batch's
    with torch.no_grad():
        eval_losses = F.cross_entropy(
            copy.deepcopy(model).eval()(inputs), targets, reduction="none"
        )
        train_losses = F.cross_entropy(copy.deepcopy(model)(inputs), targets, reduction="none")
    running_mean = model[1].running_mean.clone()
    torch.testing.assert_close(HeadProbe(model, mode="eval")(inputs, targets).losses, eval_losses)
    torch.testing.assert_close(HeadProbe(model, mode="train")(inputs, targets).losses, train_losses)
    assert torch.equal(model[1].running_mean, running_mean)
    assert not torch.allclose(eval_losses, train_losses)


def test_head_found_or_clear_error():
    model = SmallCNN()
    assert find_head(model) is model.fc
    assert HeadProbe(model, head="fc").head is model.fc
    with pytest.raises(ValueError, match=r"no nn\.Linear.*head="):
        HeadProbe(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()))
    with pytest.raises(ValueError, match="not a submodule"):
        HeadProbe(model, head=nn.Linear(16, 4))


def test_model_output_must_be_head_output():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return 2 * self.fc(x)

    with pytest.raises(ValueError, match="not the output of its head"):
        HeadProbe(Scaled())(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_output_that_equals_head_output_is_accepted():
    class Reshaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).view(-1, 3)

    result = HeadProbe(Reshaped())(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert result.gram.shape == (3, 3)


def test_head_called_twice_is_refused():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    with pytest.raises(AdaptiveBatchError, match="ran 2 times"):
        HeadProbe(Tied())(torch.randn(2, 3), torch.tensor([0, 1]))


def test_bad_arguments():
    model = mlp_bn_dropout()
    inputs = torch.randn(4, 6)
    with pytest.raises(ValueError, match="per-sample losses"):
        HeadProbe(model, loss=lambda out, y: F.cross_entropy(out, y))(inputs, torch.zeros(4).long())
    with pytest.raises(ValueError, match="targets must have 4 rows"):
        HeadProbe(model)(inputs, torch.zeros(3).long())
    with pytest.raises(ValueError, match="method"):
        HeadProbe(model, method="fast")
    with pytest.raises(ValueError, match="mode"):
        HeadProbe(model, mode="inference")
    with pytest.raises(ValueError, match="loss"):
        HeadProbe(model, loss="hinge")


def test_dict_and_tuple_inputs_reach_the_model():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, a, b):
            return self.fc(a + b)

    model, a, b, y = TwoInputs(), torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 3, (5,))
    by_tuple = HeadProbe(model)((a, b), y)
    by_dict = HeadProbe(model)({"a": a, "b": b}, y)
    torch.testing.assert_close(by_tuple.gram, by_dict.gram)


def test_autocast_forward_gives_float32_statistics():
    model = mlp_bn_dropout().eval()
    inputs, targets = torch.randn(8, 6), torch.randint(0, 5, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = HeadProbe(model)(inputs, targets)
    assert result.gram.dtype == torch.float32 and result.losses.dtype == torch.float32
    full = HeadProbe(model)(inputs, targets)
    torch.testing.assert_close(result.losses, full.losses, atol=0.05, rtol=0.05)


def test_closed_form_never_needs_per_sample_parameter_gradients():
    # The closed form is a pair of B x B products: check it on a shape whose per-sample
    # gradients (B x C x D = 64 x 1000 x 2048 floats, 500 MiB) would be costly to build.
    features, delta = torch.randn(64, 2048), torch.randn(64, 1000)
    gram = linear_head_gram(features, delta)
    expected = (delta @ delta.T) * (features @ features.T + 1)
    torch.testing.assert_close(gram, expected)


def test_functorch_gram_refuses_a_head_without_trainable_parameters():
    head = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        functorch_gram(head, torch.randn(2, 3), torch.tensor([0, 1]), label_smoothed)
