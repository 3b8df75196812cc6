"""Settings: one model, one name per setting (its FINETUNE_* variable), parsed and validated in from_env.

That every values.yaml key reaches its setting is checked against the rendered chart in test_chart.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from finetune_operator.settings import CHART_VALUES, ENV_PREFIX, Settings, SettingsError, env_var

pytestmark = pytest.mark.unit


def test_settings_from_env() -> None:
    s = Settings.from_env({"FINETUNE_TRAINER_IMAGE": "t:1", "FINETUNE_NAMESPACES": "a, b", "FINETUNE_OUTPUT_PVC": ""})
    assert s.trainer_image == "t:1" and s.namespaces == ("a", "b") and not s.clusterwide
    assert Settings.from_env({}).clusterwide
    assert Settings.from_env({}).startup_deadline_seconds == 600
    with pytest.raises(SettingsError, match="FINETUNE_STARTUP_DEADLINE_SECONDS"):
        Settings.from_env({"FINETUNE_STARTUP_DEADLINE_SECONDS": "soon"})
    with pytest.raises(SettingsError, match="FINETUNE_IMAGE_PULL_POLICY"):
        Settings.from_env({"FINETUNE_IMAGE_PULL_POLICY": "Sometimes"})


def test_each_setting_is_read_from_the_variable_of_its_own_name() -> None:
    env = {
        "FINETUNE_TRAINER_IMAGE": "registry.example.com/t:2",
        "FINETUNE_SERVE_IMAGE": "registry.example.com/s:2",
        "FINETUNE_IMAGE_PULL_POLICY": "Always",
        "FINETUNE_TRAINER_SERVICE_ACCOUNT": "trainers",
        "FINETUNE_NAMESPACES": "team-a,team-*",
        "FINETUNE_STARTUP_DEADLINE_SECONDS": "61",
        "FINETUNE_RESYNC_SECONDS": "2.5",
        "FINETUNE_TERMINATION_GRACE_SECONDS": "0",
        "FINETUNE_OUTPUT_PVC": "models",
        "FINETUNE_PROGRESS_URL": "http://op.ops.svc:9000",
        "FINETUNE_HTTP_LISTEN": "127.0.0.1:9000",
        "FINETUNE_RUN_AS_USER": "2000",
        "FINETUNE_RUN_AS_GROUP": "0",
        "FINETUNE_FS_GROUP": "3000",
        "FINETUNE_ALLOW_HOST_PATH": "true",
        "FINETUNE_SHM_SIZE": "4Gi",
        "FINETUNE_TMP_SIZE": "8Gi",
        "FINETUNE_LIVENESS_ENDPOINT": "http://0.0.0.0:9090/healthz",
        "FINETUNE_POSTING_LEVEL": "error",
        "FINETUNE_WATCH_SERVER_TIMEOUT": "60",
    }
    assert set(env) == {env_var(f.name) for f in dataclasses.fields(Settings)}, "one variable per setting"
    s = Settings.from_env(env)
    assert s == Settings(
        trainer_image="registry.example.com/t:2", serve_image="registry.example.com/s:2", image_pull_policy="Always",
        trainer_service_account="trainers",
        namespaces=("team-a", "team-*"), startup_deadline_seconds=61, resync_seconds=2.5,
        termination_grace_seconds=0, output_pvc="models", progress_url="http://op.ops.svc:9000",
        http_listen="127.0.0.1:9000", run_as_user=2000, run_as_group=0, fs_group=3000, allow_host_path=True,
        shm_size="4Gi", tmp_size="8Gi", liveness_endpoint="http://0.0.0.0:9090/healthz", posting_level="ERROR",
        watch_server_timeout=60,
    )
    assert s.listen == ("127.0.0.1", 9000)


def test_empty_keeps_the_default_except_where_empty_means_off() -> None:
    defaults = Settings()
    s = Settings.from_env({"FINETUNE_TRAINER_IMAGE": "  ", "FINETUNE_STARTUP_DEADLINE_SECONDS": "",
                           "FINETUNE_HTTP_LISTEN": ""})
    assert s.trainer_image == defaults.trainer_image and s.startup_deadline_seconds == 600
    assert s.http_listen == "" and s.listen is None  # the chart turns the server off this way
    assert Settings.from_env({}).listen == ("0.0.0.0", 8081)
    assert Settings.from_env({"FINETUNE_HTTP_LISTEN": ":8082"}).listen == ("0.0.0.0", 8082)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FINETUNE_RESYNC_SECONDS", "0"),
        ("FINETUNE_RUN_AS_USER", "0"),
        ("FINETUNE_ALLOW_HOST_PATH", "maybe"),
        ("FINETUNE_POSTING_LEVEL", "LOUD"),
        ("FINETUNE_HTTP_LISTEN", "localhost"),
        ("FINETUNE_WATCH_SERVER_TIMEOUT", "1.5"),
    ],
)
def test_a_bad_value_fails_at_startup_naming_its_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{var}: .*\(got {value!r}\)$"):
        Settings.from_env({var: value})


def test_variables_of_no_setting_are_not_read() -> None:
    assert Settings.from_env({"FINETUNE_COLLECTIVE_TIMEOUT_SECONDS": "x", "HOME": "/tmp"}) == Settings()


def test_the_chart_table_names_settings_only() -> None:
    names = {env_var(f.name) for f in dataclasses.fields(Settings)}
    named = {var for variables in CHART_VALUES.values() for var in variables}
    assert named <= names, f"not a setting: {sorted(named - names)}"
    assert names <= named, f"set by no values.yaml key: {sorted(names - named)}"
    assert all(var.startswith(ENV_PREFIX) for var in named)
