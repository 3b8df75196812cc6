import subprocess
import sys
from pathlib import Path

import pytest

from finetune_api.errors import JobFileError
from finetune_api.spec import FineTuneJobSpec, load_job, parse_job, parse_spec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DIGITS = {"dataset": {"builtin": "digits"}}


def test_import_operator_is_still_the_standard_library():
    code = "import operator, collections; print(operator.__file__); assert 'site-packages' not in operator.__file__"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert str(ROOT / "operator") not in out.stdout
    assert out.stdout.strip().endswith("operator.py")


def test_defaults_follow_the_design_contract():
    spec = parse_spec(DIGITS)
    assert spec.model.architecture == "resnet18"
    assert spec.freeze.policy == "head"
    assert spec.training.epochs == 10 and spec.training.batch_size == 32
    assert spec.output.path == "/output"
    wire = spec.to_wire()
    assert wire["dataset"]["valFraction"] == 0.2 and wire["runPolicy"]["backoffLimit"] == 2


def test_full_manifest_and_bare_spec_both_load(tmp_path):
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "cats"},
                "spec": DIGITS}
    assert parse_job(manifest).name == "cats"
    assert parse_job(DIGITS).spec.dataset.builtin == "digits"
    f = tmp_path / "job.yaml"
    f.write_text("dataset:\n  builtin: digits\ntraining:\n  epochs: 3\n")
    assert load_job(f).spec.training.epochs == 3


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({**DIGITS, "training": {"epochs": -1}}, "spec.training.epochs: Input should be greater than or equal to 1"),
        ({**DIGITS, "model": {"architecture": "resnet9"}}, "spec.model.architecture: Input should be one of"),
        ({**DIGITS, "bogus": 1}, "spec.bogus: Extra inputs are not permitted"),
        ({**DIGITS, "training": {"optimizer": "rmsprop"}}, "'adam', 'adamw' or 'sgd' (got 'rmsprop')"),
        ({"dataset": {}}, "set exactly one of dataset.builtin, dataset.path or dataset.uri"),
        ({"dataset": {"path": "/data/../etc"}}, "must not contain '..' segments"),
        ({**DIGITS, "model": {"weights": {"source": "file"}}}, "weights.path is required"),
        ({**DIGITS, "freeze": {"policy": "head", "trainableStages": 2}}, "only valid with freeze.policy 'partial'"),
        ({**DIGITS, "volumes": [{"name": "d", "mountPath": "/d"}]}, "needs exactly one source"),
        ({**DIGITS, "resources": {"memory": "lots"}}, "spec.resources.memory: String should match pattern"),
    ],
)
def test_bad_values_name_the_field(spec, expected):
    with pytest.raises(JobFileError) as err:
        parse_spec(spec)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_wrong_kind_and_non_mapping_are_rejected():
    with pytest.raises(JobFileError, match="kind"):
        parse_job({"kind": "Deployment", "spec": DIGITS})
    with pytest.raises(JobFileError, match="mapping"):
        parse_job(["a"])


def test_resume_fingerprint_ignores_epochs_but_not_learning_rate():
    base = parse_spec(DIGITS)
    more_epochs = parse_spec({**DIGITS, "training": {"epochs": 50}})
    other_lr = parse_spec({**DIGITS, "training": {"learningRate": 0.1}})
    assert base.resume_fingerprint() == more_epochs.resume_fingerprint()
    assert base.resume_fingerprint() != other_lr.resume_fingerprint()


def test_spec_module_imports_no_torch():
    code = "import sys, finetune_api.spec; assert 'torch' not in sys.modules, 'spec imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_architecture_list_matches_torchvision():
    import torchvision.models as tvm

    from finetune_api.architectures import ARCHITECTURES

    assert set(ARCHITECTURES) == set(tvm.list_models(module=tvm))
    assert isinstance(FineTuneJobSpec.model_fields["model"].default_factory().architecture, str)
