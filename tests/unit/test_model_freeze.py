import pytest
import torch
from torch import nn
from torchvision import models as tvm

from finetune_api.errors import JobFileError, TrainingError
from finetune_api.spec import Freeze, Head, Training, Weights, parse_spec
from finetune_trainer.freeze import apply_freeze, backbone_stages, param_groups, plan_freeze, set_train_mode
from finetune_trainer.model import build_model, find_head, load_weights_file, replace_head

pytestmark = pytest.mark.unit


def spec_for(arch, size=32, **extra):
    return parse_spec({"model": {"architecture": arch, "weights": {"source": "none"}},
                       "dataset": {"builtin": "digits", "imageSize": size}, **extra})


@pytest.mark.parametrize(
    ("arch", "size"),
    [("resnet18", 32), ("resnet34", 32), ("resnet50", 32), ("mobilenet_v3_small", 32), ("mobilenet_v3_large", 32),
     ("efficientnet_b0", 32), ("convnext_tiny", 32), ("vit_b_16", 224), ("squeezenet1_1", 64)],
)
def test_any_architecture_gets_a_new_head(arch, size):
    built = build_model(spec_for(arch, size), num_classes=7)
    built.model.eval()
    with torch.inference_mode():
        out = built.model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 7)
    assert built.head_name == find_head(tvm.get_model(arch))


def test_hidden_head_has_dropout_and_two_layers():
    model = tvm.resnet18()
    replace_head(model, 4, Head(hidden_units=16, dropout=0.3))
    kinds = [type(m) for m in model.fc]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.fc[0].in_features == 512 and model.fc[-1].out_features == 4


def test_resnet_stages_are_its_layers():
    model = tvm.resnet50()
    stages = backbone_stages(model, "fc")
    assert [s.name for s in stages] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert stages[0].modules == ["conv1", "bn1"]


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_partial_and_full_change_exactly_the_intended_parameters():
    model = tvm.resnet18()
    replace_head(model, 3, Head())
    plan = plan_freeze(model, "fc", Freeze(policy="partial", trainable_stages=2))
    apply_freeze(model, plan)
    expected = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("layer3", "layer4", "fc")}
    assert _trainable(model) == expected
    full = plan_freeze(model, "fc", Freeze(policy="full"))
    apply_freeze(model, full)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    head = plan_freeze(model, "fc", Freeze(policy="head"))
    apply_freeze(model, head)
    assert _trainable(model) == {"fc.weight", "fc.bias"}


def test_too_many_stages_is_a_config_error():
    model = tvm.resnet18()
    with pytest.raises(JobFileError, match="exceeds the 5 stages"):
        plan_freeze(model, "fc", Freeze(policy="partial", trainable_stages=6))


def test_frozen_batchnorm_stays_in_eval_mode():
    model = tvm.resnet18()
    plan = plan_freeze(model, "fc", Freeze(policy="partial", trainable_stages=1))
    apply_freeze(model, plan)
    set_train_mode(model, plan)
    assert not model.bn1.training and not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training and model.fc.training


def test_backbone_lr_scale_shows_in_param_groups():
    model = tvm.resnet18()
    plan = plan_freeze(model, "fc", Freeze(policy="partial", backbone_lr_scale=0.25))
    apply_freeze(model, plan)
    groups = param_groups(model, plan, Training(learning_rate=0.02), 0.25)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == pytest.approx(0.02)
    assert by_name["backbone"]["lr"] == pytest.approx(0.005)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)
    head_only = plan_freeze(model, "fc", Freeze(policy="head"))
    apply_freeze(model, head_only)
    assert [g["name"] for g in param_groups(model, head_only, Training(), 0.1)] == ["head"]


def _save(tmp_path, state, name="w.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return Weights(source="file", path=str(path))


def test_weights_file_formats_load_and_old_head_is_dropped(tmp_path):
    src = tvm.resnet18(num_classes=10)
    for i, wrap in enumerate([lambda s: s, lambda s: {"model": s, "epoch": 3}, lambda s: {"state_dict": s}]):
        target = tvm.resnet18()
        replace_head(target, 4, Head())
        note = load_weights_file(target, _save(tmp_path, wrap(src.state_dict()), f"w{i}.pt"))
        assert "old head dropped" in note
        assert torch.equal(target.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    target = tvm.resnet18()
    load_weights_file(target, Weights(source="file", path=str(tmp_path / "w.safetensors")))
    assert torch.equal(target.conv1.weight, src.conv1.weight)


def test_weights_with_wrong_shapes_are_reported_per_tensor(tmp_path):
    wrong = tvm.resnet34().state_dict()
    wrong["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(JobFileError) as err:
        load_weights_file(tvm.resnet18(), _save(tmp_path, wrong))
    msg = str(err.value)
    assert "conv1.weight: file (8, 3, 3, 3) vs model (64, 3, 7, 7)" in msg
    assert "unexpected tensor" in msg


def test_weights_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(JobFileError, match="is not a readable checkpoint"):
        load_weights_file(tvm.resnet18(), Weights(source="file", path=str(bad)))


def test_torchvision_weights_offline_fail_clearly(monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    spec = parse_spec({"model": {"architecture": "resnet18", "weights": {"source": "torchvision",
                       "name": "IMAGENET1K_V1"}}, "dataset": {"builtin": "digits"}})
    with pytest.raises(TrainingError, match=r"cannot download torchvision weights ResNet18_Weights\.IMAGENET1K_V1"):
        build_model(spec, 3)


def test_unknown_torchvision_weights_name_lists_choices():
    spec = parse_spec({"model": {"weights": {"name": "IMAGENET9K"}}, "dataset": {"builtin": "digits"}})
    with pytest.raises(JobFileError, match="choose DEFAULT, IMAGENET1K_V1"):
        build_model(spec, 3)
