"""The realign-k8s deployment: its job template, rendered as the Kubernetes worker renders it.

prefect-kubernetes' own ``KubernetesWorkerJobConfiguration`` fills the pool's base job template
(deploy/k8s-gpu-job-template.json) with the deployment's job_variables and prepares it for a
flow run; the manifest it would send to the cluster must ask for the GPU, the image, the env and
the state volume. No cluster and no Prefect API are involved (rendering asks the API nothing).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "k8s-gpu-job-template.json"


class NoAPI:
    """A client that fails the test if rendering reaches for the Prefect API."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"rendering the job template asked the Prefect API for {name}")


def _deployment(name: str) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}[name]


def _render(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(
            template, job_variables, client=NoAPI()
        )
    )
    run = FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4())
    config.prepare_for_flow_run(run)
    return config.job_manifest


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[str, Any]:
    return _deployment("realign-k8s")


def test_the_template_is_a_valid_kubernetes_pool_template(template):
    """What the server checks on `work-pool create`: every placeholder names a variable."""
    from prefect.server.schemas.actions import WorkPoolCreate  # the server-side model
    from prefect_kubernetes.worker import KubernetesWorker

    WorkPoolCreate(name="lssf-k8s", type="kubernetes", base_job_template=template)
    default = KubernetesWorker.get_default_base_job_template()
    # Derived from the pinned prefect-kubernetes' default: nothing of it is lost.
    assert set(default["variables"]["properties"]) < set(template["variables"]["properties"])
    assert set(default["job_configuration"]) == set(template["job_configuration"])


def test_the_deployment_variables_validate_against_the_template(template, k8s):
    from prefect.utilities.schema_tools.validation import validate

    assert k8s["work_pool"]["name"] == "lssf-k8s"
    assert k8s["entrypoint"] == _deployment("realign")["entrypoint"]
    validate(k8s["work_pool"]["job_variables"], template["variables"], raise_on_error=True)


def test_the_rendered_job_asks_for_one_gpu_the_image_and_the_env(template, k8s):
    variables = k8s["work_pool"]["job_variables"]
    manifest = _render(template, variables)
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "lssf"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert container["image"] == variables["image"] and ":" in container["image"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert variables["env"].items() <= env.items()
    assert env["HF_HOME"].startswith("/data/")  # on the state volume
    assert "PREFECT__FLOW_RUN_ID" in env  # the worker's own, still there
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount == {"name": volume["name"], "mountPath": "/data"}
    assert volume["persistentVolumeClaim"] == {"claimName": "lssf-state"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_gpu_count_is_a_job_variable(template, k8s):
    variables = k8s["work_pool"]["job_variables"] | {"gpu_limit": 2}
    (container,) = _render(template, variables)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_the_k8s_variant_never_doubles_the_event_trigger(k8s):
    """Both deployments listen for the same event; only one may be enabled at a time."""
    (trigger,) = k8s["triggers"]
    (process,) = _deployment("realign")["triggers"]
    assert trigger["enabled"] is False and process["enabled"] is True
    assert {k: v for k, v in trigger.items() if k != "enabled"} == {
        k: v for k, v in process.items() if k != "enabled"
    }
    assert k8s["pull"][0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": "/opt/lssf"
    }
