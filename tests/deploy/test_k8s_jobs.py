"""The offline Jobs (deploy/k8s/jobs): each renders with kustomize and validates against the
Kubernetes API schemas (the PyTorchJob, a Kubeflow kind with no schema there, by its structure and
its pod templates as PodTemplates), and their command lines parse with the real torchrun and
`reclora`, read from the claims the serving side uses, and agree with their own topology."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

import kubernetes_validate
import pytest
import typer
from torch.distributed.run import get_args_parser

from tests.deploy.k8s_support import JOBS, K8S, README, containers, pod_spec, render, render_dir
from training.cli import app

KUBERNETES_VERSION = "1.32.0"
CRD_GROUPS = ("kubeflow.org/",)
SERVING = "gpu-vllm"  # the overlay whose claims the Jobs share
WORK_CLAIM, BASE_MODEL_CLAIM = "reclora-work", "reclora-base-model"
REPLICA_RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}


def job_objects(job: str) -> tuple[dict, ...]:
    return render_dir(K8S / "jobs" / job)


def one(job: str, kind: str) -> dict:
    (obj,) = [o for o in job_objects(job) if o["kind"] == kind]
    return obj


def pod_templates(job: str) -> list[dict]:
    """Every pod template of the job's workloads (a PyTorchJob's per replica type)."""
    templates = []
    for obj in job_objects(job):
        if obj["kind"] == "Job":
            templates.append(obj["spec"]["template"])
        elif obj["kind"] == "PyTorchJob":
            templates += [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return templates


def reclora_args(args: list[str]) -> list[str]:
    """The `reclora` arguments of a command line: after `-m training.cli` (torchrun) or whole."""
    return args[args.index("training.cli") + 1:] if "training.cli" in args else args


def parse_reclora(args: list[str]) -> dict:
    """The subcommand's parameters as the real `reclora` command line parses them (nothing runs)."""
    command = typer.main.get_command(app)
    name, rest = args[0], args[1:]
    return command.commands[name].make_context(name, list(rest)).params


def claim_at(template: dict, container: dict, path: str) -> tuple[str | None, bool]:
    """(claim, read-only) of the mount holding ``path``."""
    mounts = [m for m in container["volumeMounts"]
              if PurePosixPath(path).is_relative_to(PurePosixPath(m["mountPath"]))]
    assert mounts, f"{path} is on no volume of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    return volume.get("persistentVolumeClaim", {}).get("claimName"), bool(mount.get("readOnly"))


def test_the_three_jobs_exist() -> None:
    assert set(JOBS) == {"training-pytorchjob", "training-indexed-job", "knowledge-vllm-job"}


@pytest.mark.parametrize("job", JOBS)
def test_every_object_validates_against_the_kubernetes_schemas(job) -> None:
    failures = []
    for obj in job_objects(job):
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue  # structure below; its pod templates are validated as PodTemplates
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {getattr(exc, 'message', exc)}")
    for i, template in enumerate(pod_templates(job)):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{job}-{i}"},
                   "template": template}
        try:
            kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{job} pod template {i}: {exc.message}")
    assert not failures, "\n".join(failures)
    assert all(o["metadata"]["namespace"] == "reclora" for o in job_objects(job))


@pytest.mark.parametrize("job", JOBS)
def test_jobs_mount_the_serving_sides_base_model_and_the_work_claim(job) -> None:
    serving_claims = {o["metadata"]["name"]: o for o in render(SERVING) if o["kind"] == "PersistentVolumeClaim"}
    claims = {o["metadata"]["name"]: o for o in job_objects(job) if o["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {WORK_CLAIM}  # the serving side's claims are referenced, never made again
    assert claims[WORK_CLAIM]["spec"]["accessModes"] == ["ReadWriteMany"]
    for template in pod_templates(job):
        (container,) = template["spec"]["containers"]
        params = parse_reclora(reclora_args(container["args"]))
        assert claim_at(template, container, str(params["data"])) == (WORK_CLAIM, False)
        assert claim_at(template, container, str(params["out"])) == (WORK_CLAIM, False)
        claim, read_only = claim_at(template, container, str(params["base_model"]))
        assert claim == BASE_MODEL_CLAIM and read_only and claim in serving_claims
        # The base model sits in the claim under the name the serving side reads.
        assert PurePosixPath(params["base_model"]).name == "smollm2-135m-instruct"


@pytest.mark.parametrize("job", JOBS)
def test_containers_are_locked_down_and_run_offline(job) -> None:
    for template in pod_templates(job):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
            assert context["capabilities"]["drop"] == ["ALL"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HF_HUB_OFFLINE"] == "1" and env["HOME"].startswith("/home/")
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert {"/tmp", env["HOME"]} <= writable
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus >= 1


COMPLETION_INDEX = "1"  # what the Job controller writes into a pod's completion-index annotation


def expanded(container: dict) -> list[str]:
    """The arguments as the kubelet hands them over: $(VAR) replaced from the container's env (a
    field reference by a sample value)."""
    env = {e["name"]: e["value"] if "value" in e else COMPLETION_INDEX for e in container.get("env", [])}
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def torchrun(container: dict) -> tuple:
    """torchrun's own arguments as torchrun parses them, and the module's arguments."""
    assert container["command"] == ["torchrun"]
    parsed = get_args_parser().parse_args(expanded(container))
    assert parsed.module and parsed.training_script == "training.cli"
    return parsed, parsed.training_script_args


def test_pytorchjob_structure() -> None:
    job = one("training-pytorchjob", "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["metadata"]["name"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for spec in replicas.values():
        assert spec["restartPolicy"] in REPLICA_RESTART_POLICIES
        assert set(spec) <= {"replicas", "restartPolicy", "template"}
    # The same container on every node: the operator tells them apart by rank only.
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    assert set(job["spec"]["runPolicy"]) <= {"backoffLimit", "cleanPodPolicy", "ttlSecondsAfterFinished",
                                             "activeDeadlineSeconds", "schedulingPolicy", "suspend"}
    (container,) = replicas["Master"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"  # the container the operator gives its rendezvous variables
    parsed, script_args = torchrun(container)
    # One process per GPU; the nodes, the rank and rank 0's address come from the operator (PET_*).
    assert str(parsed.nproc_per_node) == job["spec"]["nprocPerNode"]
    assert int(parsed.nproc_per_node) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert not {"--nnodes", "--node-rank", "--node_rank", "--master-addr", "--master_addr"} & {
        a.split("=")[0] for a in container["args"]}
    assert script_args[0] == "train-llm" and parse_reclora(script_args)["checkpoint_every"] > 0


def test_indexed_job_meets_at_rank_zero_through_its_headless_service() -> None:
    job = one("training-indexed-job", "Job")
    service = one("training-indexed-job", "Service")
    spec, name = job["spec"], job["metadata"]["name"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    (container,) = pod_spec(job)["containers"]
    parsed, script_args = torchrun(container)
    assert int(parsed.nnodes) == spec["completions"]
    assert int(parsed.nproc_per_node) == container["resources"]["limits"]["nvidia.com/gpu"]
    # The node rank is the pod's completion index.
    (rank_arg,) = [a for a in container["args"] if a.startswith("--node-rank=")]
    (rank,) = [e for e in container["env"] if rank_arg == f"--node-rank=$({e['name']})"]
    assert str(parsed.node_rank) == COMPLETION_INDEX
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == index
    # Rank 0 is pod <job>-0 under the headless Service named as the pods' subdomain.
    assert pod_spec(job)["subdomain"] == service["metadata"]["name"]
    assert parsed.master_addr == f"{name}-0.{service['metadata']['name']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert int(parsed.master_port) in {p["port"] for p in service["spec"]["ports"]}
    assert int(parsed.master_port) in {p["containerPort"] for p in container["ports"]}
    assert script_args[0] == "train-llm" and parse_reclora(script_args)["checkpoint_every"] > 0


def test_knowledge_job_generates_with_vllm() -> None:
    job = one("knowledge-vllm-job", "Job")
    (container,) = containers(job)
    assert container["command"] == ["reclora"] and container["image"].startswith("reclora-knowledge-vllm:")
    params = parse_reclora(container["args"])
    assert params["engine"] == "vllm" and params["vllm_python"] is None  # from the environment:
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert PurePosixPath(env["RECLORA_VLLM_PYTHON"]).is_absolute()
    assert isinstance(json.loads(params["vllm_engine_args"]), dict)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 1
    dockerfile = (K8S.parent / "knowledge-vllm.Dockerfile").read_text()
    assert f"RECLORA_VLLM_PYTHON={env['RECLORA_VLLM_PYTHON']}" in dockerfile


def test_readme_describes_every_job() -> None:
    text = README.read_text()
    for job in JOBS:
        assert f"jobs/{job}" in text
    assert "kubeflow.org/v1" in text and "torchrun" in text and "--engine vllm" in text
